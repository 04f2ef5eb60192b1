"""Score one chunk of a job: fetch the images a few ahead of the model, write outputs and result rows.

Per image: a missing or unreadable object (no such key or bucket, access denied), an object above
`TOTALRECALL_MAX_IMAGE_BYTES`, an undecodable or refused image, or a download that did not finish within
the chunk's time budget becomes that image's `failed` row with the reason, and the rest of the chunk goes
on. An error the engine does not attribute to one image makes the chunk score its images one at a time,
so the image that causes it fails alone.

Per chunk: storage that does not answer (`StorageUnavailable`) and database errors propagate, so the task
retries the whole chunk, and so does a worker whose disk or memory runs out while loading the model
(`WorkerShortOfResources`); a model that cannot be loaded (`ModelUnusable`) or outputs that cannot be written
fail the job. A chunk stopped by its soft time limit records what it finished and a failed row for the
rest. Rows are written in one transaction, only for images whose mask and heatmap are already stored
(which images get them: `TOTALRECALL_SAVE_MAPS`, see `saves_maps`).

Memory stays bounded whatever the chunk and image sizes: at most `download_threads` images are
downloaded ahead of the model, decoding is bounded by the image limits (`common.images`), at most
`WRITE_THREADS` finished images wait for their outputs to be written, and freed memory is handed back to
the operating system after each chunk.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import date
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import SQLAlchemyError

from common.db import Job, ResultStatus, images_with_results, in_transaction
from common.engine.patchcore import ImageResult, PatchCore
from common.logs import log_context, log_event
from common.memory import release_memory
from common.settings import get_settings, redact_text
from common.storage import Storage, StorageError, StorageUnavailable, open_storage, read_uri
from workers.job_state import (
    WorkerShortOfResources,
    describe_error,
    mark_running,
    record_chunk,
    short_of_resources,
)
from workers.model_cache import get_model_cache
from workers.outputs import heatmap_png, mask_png, output_keys

logger = logging.getLogger(__name__)

WRITE_THREADS = 2  # also the number of finished images that may wait for their outputs to be written
TIME_BUDGET = 0.8  # of the soft time limit: images not downloaded by then fail, and scoring stops there


class ModelUnusable(RuntimeError):
    """The job's model cannot be loaded (corrupted, incompatible or missing artifact): the job fails."""


class DownloadTimeout(TimeoutError):
    """An image was not downloaded within the chunk's time budget (an `OSError`: a per-image failure)."""


class ImageFetchError(OSError):
    """Storage refused one image (no such bucket, access denied ...): that image's failure."""


# Errors that concern the whole chunk: retried or failing the job, never blamed on one image.
CHUNK_ERRORS = (SoftTimeLimitExceeded, StorageError, ModelUnusable, WorkerShortOfResources, SQLAlchemyError)


@dataclass(frozen=True)
class ChunkContext:
    """What scoring needs to know about the job, read once from the database."""

    job_id: int
    product_id: int
    product: str
    version_id: int
    version: int
    sha256: str
    artifact_uri: str
    images_uri: str | None
    run_date: date | None

    @property
    def folder(self) -> str:
        """Output folder below results/<product>/<version>/: the captured date, else the job."""
        return self.run_date.isoformat() if self.run_date else f"job-{self.job_id}"


@dataclass(frozen=True)
class ChunkOutcome:
    scored: int  # images with an ok row written now
    failed: int  # images with a failed row written now
    skipped: int  # images that already had an ok result for the model version


def chunk_deadline() -> float:
    """The `deadline` for a chunk starting now: `TIME_BUDGET` of the score soft time limit."""
    return time.monotonic() + TIME_BUDGET * get_settings().score_time_limits[0]


def score_chunk(job_id: int, image_uris: Sequence[str], deadline: float | None = None) -> ChunkOutcome:
    """Score the images of one chunk and record them; safe to run again for the same chunk.

    `deadline` (`time.monotonic()` seconds): images not downloaded by then fail, and scoring stops there.
    """
    started = time.monotonic()
    context = load_context(job_id)
    with chunk_log_context(context):
        try:
            outcome, stopped = _score_and_record(context, list(dict.fromkeys(image_uris)), deadline)
        except Exception as exc:  # the task retries the chunk or fails the job
            log_event(logger, logging.WARNING, "chunk_failed", images=len(image_uris),
                      seconds=time.monotonic() - started, error=describe_error(exc))
            raise
        log_event(logger, logging.WARNING if stopped else logging.INFO, "chunk_scored",
                  images=outcome.scored + outcome.failed + outcome.skipped, scored=outcome.scored,
                  failed=outcome.failed, skipped=outcome.skipped, seconds=time.monotonic() - started,
                  stopped=stopped)
    return outcome


def _score_and_record(context: ChunkContext, uris: list[str], deadline: float | None
                      ) -> tuple[ChunkOutcome, str | None]:
    """Score the images without an ok result and record their rows; also why scoring stopped early."""
    mark_running(context.job_id)
    already = in_transaction(lambda s: images_with_results(s, context.version_id, uris, ok_only=True))
    todo = [u for u in uris if u not in already]
    log_event(logger, logging.INFO, "chunk_started", images=len(uris), todo=len(todo), skipped=len(already))
    scorer = ChunkScorer(context, todo, deadline)
    try:
        scorer.run()
    except SoftTimeLimitExceeded:
        soft = get_settings().score_time_limits[0]
        scorer.stop(f"not scored: the chunk hit its soft time limit ({soft} s)")
    finally:
        release_memory()
    rows = scorer.rows()
    if rows:
        record_chunk(context.job_id, rows)
    failed = sum(r["status"] == ResultStatus.FAILED.value for r in rows)
    return ChunkOutcome(len(rows) - failed, failed, len(already)), scorer.stopped


def chunk_log_context(context: ChunkContext) -> contextlib.AbstractContextManager[None]:
    """Every event logged while scoring names the job, its product and the model version."""
    return log_context(job=context.job_id, product=context.product, version=context.version)


def give_up(job_id: int, image_uris: Sequence[str], reason: str) -> ChunkOutcome:
    """Record a failed row with `reason` for each image of the chunk that has no ok result."""
    context = load_context(job_id)
    uris = list(dict.fromkeys(image_uris))
    with chunk_log_context(context):
        already = in_transaction(lambda s: images_with_results(s, context.version_id, uris, ok_only=True))
        rows = [_failed_row(context, u, reason) for u in uris if u not in already]
        if rows:
            record_chunk(job_id, rows)
        log_event(logger, logging.ERROR, "chunk_given_up", images=len(uris), failed=len(rows),
                  skipped=len(already), reason=reason)
    return ChunkOutcome(0, len(rows), len(already))


def load_context(job_id: int) -> ChunkContext:
    def read(session: Any) -> ChunkContext:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        version = job.model_version
        if version is None or version.sha256 is None or version.artifact_uri is None:
            raise LookupError(f"job {job_id} has no fitted model version to score with")
        return ChunkContext(job.id, job.product_id, job.product.name, version.id, version.version,
                            version.sha256, version.artifact_uri, job.images_uri, job.run_date)

    return in_transaction(read)


def load_model(context: ChunkContext) -> PatchCore:
    """The job's model from the worker's cache; `ModelUnusable` if its artifact is refused or missing,
    `WorkerShortOfResources` if this worker's disk or memory ran out while loading it."""
    try:
        return get_model_cache().get(context.sha256, context.artifact_uri)
    except (SoftTimeLimitExceeded, StorageUnavailable, SQLAlchemyError):
        raise
    except Exception as exc:
        if short_of_resources(exc):
            raise WorkerShortOfResources(f"this worker ({socket.gethostname()}) could not load model version "
                                         f"{context.version} of {context.product!r}: {describe_error(exc)}") from exc
        raise ModelUnusable(f"model version {context.version} of {context.product!r} cannot be used: "
                            f"{describe_error(exc)}") from exc


class ChunkScorer:
    """Scores a chunk's images and keeps each finished image's row, so a chunk stopped half-way (time
    limit) can still record what it did."""

    def __init__(self, context: ChunkContext, uris: Sequence[str], deadline: float | None = None) -> None:
        self.context = context
        self.uris = list(uris)
        self.deadline = deadline
        self.settings = get_settings()
        self.finished: dict[str, dict[str, Any]] = {}
        self.unfinished_reason = "not processed"
        self.stopped: str | None = None  # why scoring stopped early (time limit), if it did

    def run(self) -> None:
        """Score every image; one image at a time if something in the batch fails unexpectedly."""
        try:
            self._score(self.uris)
        except CHUNK_ERRORS:
            raise
        except Exception as exc:
            log_event(logger, logging.ERROR, "chunk_failed_as_a_whole", images=len(self.uris),
                      error=describe_error(exc), action="scoring its images one at a time", exc_info=True)
            for uri in [u for u in self.uris if u not in self.finished]:
                try:
                    self._score([uri])
                except CHUNK_ERRORS:
                    raise
                except Exception as exc:
                    self.finished[uri] = _failed_row(self.context, uri, describe_error(exc))

    def stop(self, reason: str) -> None:
        """The images without a row yet will get a failed row saying `reason`."""
        self.unfinished_reason = reason
        self.stopped = reason

    def rows(self) -> list[dict[str, Any]]:
        """One row per image, in order: its own, or a failed one with the reason it was not finished."""
        return [self.finished.get(u) or _failed_row(self.context, u, self.unfinished_reason)
                for u in self.uris]

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _score(self, uris: list[str]) -> None:
        settings = self.settings
        store = open_storage(settings.storage_url)
        downloads = ThreadPoolExecutor(settings.download_threads, thread_name_prefix="totalrecall-get")
        uploads = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="totalrecall-put")
        fetcher = Prefetcher(downloads, uris, settings.download_threads, settings.max_image_bytes,
                             self.deadline)
        writes: deque[tuple[str, dict[str, Any], Future]] = deque()
        try:
            fetcher.start()  # the first downloads run while the model loads
            model = load_model(self.context)
            with contextlib.closing(model.iter_predict(fetcher.loaders())) as results:
                for pos, result in results:
                    self._finish(store, uploads, writes, model, uris[pos], result)
                    self._collect(writes, keep=WRITE_THREADS)
                    if self._out_of_time():
                        self.stop(f"not scored: the chunk's time budget ran out ({TIME_BUDGET:.0%} of "
                                  f"its soft time limit of {settings.score_time_limits[0]} s)")
                        break
            self._collect(writes, keep=0)
        finally:
            self._collect_written(writes)
            downloads.shutdown(wait=False, cancel_futures=True)
            uploads.shutdown(wait=False, cancel_futures=True)

    def _finish(self, store: Storage, uploads: ThreadPoolExecutor, writes: deque, model: PatchCore,
                uri: str, result: ImageResult) -> None:
        c = self.context
        if not result.ok:
            self.finished[uri] = _failed_row(c, uri, result.error or "not processed")
        elif not saves_maps(self.settings.save_maps, result, nightly=c.run_date is not None):
            self.finished[uri] = _ok_row(c, uri, result, model, None, None)
        else:
            mask_key, heatmap_key = output_keys(c.product, c.version, c.folder, uri, c.images_uri)
            row = _ok_row(c, uri, result, model, store.uri_for(mask_key), store.uri_for(heatmap_key))
            writes.append((uri, row, uploads.submit(_write_outputs, store, mask_key, heatmap_key, result,
                                                    model.pixel_threshold)))
        if self.settings.test_chunk_delay:
            time.sleep(self.settings.test_chunk_delay)  # fault-injection tests only: "slow" images

    def _collect(self, writes: deque, keep: int) -> None:
        """Wait for the oldest writes until at most `keep` are pending; re-raises a storage error."""
        while writes and (len(writes) > keep or writes[0][2].done()):
            uri, row, future = writes.popleft()
            future.result()  # no row is written without its files
            self.finished[uri] = row

    def _collect_written(self, writes: deque) -> None:
        """After an interruption: keep the rows whose outputs did get written."""
        for uri, row, future in writes:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.finished[uri] = row
        writes.clear()


class Prefetcher:
    """Downloads a chunk's images at most `window` ahead of the model, each within the chunk's deadline."""

    def __init__(self, pool: ThreadPoolExecutor, uris: Sequence[str], window: int, max_bytes: int,
                 deadline: float | None) -> None:
        self.pool, self.uris, self.window = pool, list(uris), max(1, window)
        self.max_bytes, self.deadline = max_bytes, deadline
        self._futures: dict[int, Future] = {}
        self._submitted = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._submit_until(self.window)

    def loaders(self) -> list[Callable[[], bytes]]:
        """One callable per image for the engine; each returns the image's bytes."""
        return [partial(self.load, pos) for pos in range(len(self.uris))]

    def load(self, pos: int) -> bytes:
        self._submit_until(pos + 1 + self.window)
        with self._lock:
            future = self._futures.pop(pos)  # not kept: the bytes are freed once decoded
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is not None and remaining <= 0 and not future.done():
            future.cancel()
            raise DownloadTimeout("not downloaded: the chunk's time budget had run out")
        try:
            return future.result(timeout=remaining)
        except FutureTimeout:
            future.cancel()
            raise DownloadTimeout("download did not finish within the chunk's time budget") from None
        except StorageUnavailable:
            raise  # the store is down, not this image: the chunk is retried
        except StorageError as exc:
            if isinstance(exc, KeyError | ValueError):  # not found, too large, bad key: the engine reports it
                raise
            raise ImageFetchError(str(exc)) from exc

    def _submit_until(self, end: int) -> None:
        with self._lock:
            while self._submitted < min(end, len(self.uris)):
                uri = self.uris[self._submitted]
                self._futures[self._submitted] = self.pool.submit(read_uri, uri, self.max_bytes)
                self._submitted += 1


def saves_maps(policy: str, result: ImageResult, nightly: bool) -> bool:
    """Whether a scored image gets its mask and heatmap PNGs under `TOTALRECALL_SAVE_MAPS`.

    "findings" (default): in nightly jobs, images with an anomalous verdict or a non-empty mask, the ones
    an inspector opens; a nominal image's row (score, verdict, defect fraction 0, location of its
    maximum) says what its empty mask would, and skipping its two PNGs saves two uploads and their storage
    per image. Ad-hoc jobs (`totalrecall score`) keep every image's maps: whoever names images wants to
    see them, e.g. to ask why one was not flagged."""
    if policy == "none":
        return False
    if policy == "all" or not nightly:
        return True
    return bool(result.is_anomalous or result.defect_fraction)


def _write_outputs(store: Storage, mask_key: str, heatmap_key: str, result: ImageResult,
                   pixel_threshold: float) -> None:
    store.put_bytes(mask_key, mask_png(result), "image/png")
    store.put_bytes(heatmap_key, heatmap_png(result, pixel_threshold), "image/png")


def _row(context: ChunkContext, uri: str, **values: Any) -> dict[str, Any]:
    """A results row; every row has the same keys (one multi-row INSERT)."""
    row = {"job_id": context.job_id, "model_version_id": context.version_id,
           "product_id": context.product_id, "image_uri": uri, "captured_date": context.run_date,
           "status": ResultStatus.OK.value, "score": None, "threshold": None, "is_anomalous": None,
           "mask_uri": None, "heatmap_uri": None, "defect_fraction": None, "max_y": None, "max_x": None,
           "error": None}
    row.update(values)
    return row


def _ok_row(context: ChunkContext, uri: str, result: ImageResult, model: PatchCore, mask_uri: str | None,
            heatmap_uri: str | None) -> dict[str, Any]:
    y, x = result.max_location
    return _row(context, uri, score=result.score, threshold=model.image_threshold,
                is_anomalous=result.is_anomalous, mask_uri=mask_uri, heatmap_uri=heatmap_uri,
                defect_fraction=result.defect_fraction, max_y=y, max_x=x)


def _failed_row(context: ChunkContext, uri: str, error: str) -> dict[str, Any]:
    return _row(context, uri, status=ResultStatus.FAILED.value, error=redact_text(error)[:2000])
