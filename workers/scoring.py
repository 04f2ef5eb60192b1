"""Score one chunk of a job: fetch the images concurrently, run the model, write outputs and result rows.

Images are downloaded by a thread pool while the model computes: the engine's loader receives callables
that wait for their download. A missing object or an undecodable image becomes that image's `failed` row
(the engine reports it as a per-image failure); `StorageUnavailable` propagates, so the task can retry the
whole chunk. All rows of the chunk are written in one transaction, after every output file is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from typing import Any

from common.db import Job, ResultStatus, images_with_results, record_results, session_scope
from common.engine.patchcore import ImageResult, PatchCore
from common.settings import get_settings, redact_text
from common.storage import Storage, open_storage, read_uri
from workers.job_state import lock_job, mark_running, refresh_counts
from workers.model_cache import get_model_cache
from workers.outputs import heatmap_png, mask_png, output_keys


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


def score_chunk(job_id: int, image_uris: Sequence[str]) -> ChunkOutcome:
    """Score the images of one chunk and record them; safe to run again for the same chunk."""
    context = load_context(job_id)
    mark_running(job_id)
    uris = list(dict.fromkeys(image_uris))
    with session_scope() as session:
        already = images_with_results(session, context.version_id, uris, ok_only=True)
    todo = [u for u in uris if u not in already]
    rows = score_images(context, todo) if todo else []
    with session_scope() as session:
        job = lock_job(session, job_id)
        record_results(session, rows)
        refresh_counts(session, job)
    failed = sum(r["status"] == ResultStatus.FAILED.value for r in rows)
    return ChunkOutcome(len(rows) - failed, failed, len(already))


def load_context(job_id: int) -> ChunkContext:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        version = job.model_version
        if version is None or version.sha256 is None or version.artifact_uri is None:
            raise LookupError(f"job {job_id} has no fitted model version to score with")
        return ChunkContext(job.id, job.product_id, job.product.name, version.id, version.version,
                            version.sha256, version.artifact_uri, job.images_uri, job.run_date)


def score_images(context: ChunkContext, uris: Sequence[str]) -> list[dict[str, Any]]:
    """One result row per image of `uris` (same order), after storing the outputs of the scored ones."""
    settings = get_settings()
    store = open_storage(settings.storage_url)
    pool = ThreadPoolExecutor(settings.download_threads, thread_name_prefix="totalrecall-io")
    try:
        loaders = [_prefetch(pool, uri) for uri in uris]  # downloads start before the model loads
        model = get_model_cache().get(context.sha256, context.artifact_uri)
        rows: list[dict[str, Any]] = [{}] * len(uris)
        writes: list[Future] = []
        for pos, result in model.iter_predict(loaders):
            if result.ok:
                mask_key, heatmap_key = output_keys(context.product, context.version, context.folder,
                                                    uris[pos], context.images_uri)
                writes.append(pool.submit(_write_outputs, store, mask_key, heatmap_key, result,
                                          model.pixel_threshold))
                rows[pos] = _ok_row(context, uris[pos], result, model, store.uri_for(mask_key),
                                    store.uri_for(heatmap_key))
            else:
                rows[pos] = _failed_row(context, uris[pos], result.error or "not processed")
        for write in writes:
            write.result()  # re-raises a storage error: no row is written without its files
        return rows
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _prefetch(pool: ThreadPoolExecutor, uri: str) -> Callable[[], bytes]:
    """A loader for the engine that returns the image's bytes once the pool has fetched them."""
    pending = [pool.submit(read_uri, uri)]

    def load() -> bytes:
        return pending.pop().result()  # pop: the bytes are not kept alive after decoding

    return load


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


def _ok_row(context: ChunkContext, uri: str, result: ImageResult, model: PatchCore, mask_uri: str,
            heatmap_uri: str) -> dict[str, Any]:
    y, x = result.max_location
    return _row(context, uri, score=result.score, threshold=model.image_threshold,
                is_anomalous=result.is_anomalous, mask_uri=mask_uri, heatmap_uri=heatmap_uri,
                defect_fraction=result.defect_fraction, max_y=y, max_x=x)


def _failed_row(context: ChunkContext, uri: str, error: str) -> dict[str, Any]:
    return _row(context, uri, status=ResultStatus.FAILED.value, error=redact_text(error)[:2000])
