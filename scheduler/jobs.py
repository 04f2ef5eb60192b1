"""Job rows and their tasks: a job row is committed first, then its tasks are sent (ids only, no bytes).

In-process mode (no broker) runs each task inline when it is sent, so the caller returns after the work.
With a broker, sending retries while it is unreachable (`TOTALRECALL_ENQUEUE_RETRY_SECONDS`); after that
the job is marked failed with the reason. Chunks sent before the failure still run and record their rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from common.db import UNFINISHED, Job, JobKind, JobStatus, Product, Result, session_scope, utcnow
from common.logs import log_context, log_event
from common.settings import get_settings, redact_text
from scheduler.products import SchedulingError
from workers.job_state import fail_locked_job, locked_job
from workers.tasks import fit_product, score_chunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledJob:
    """What scheduling did for one product."""

    product: str
    job_id: int
    created: bool  # False: the job existed already (same nightly run) and nothing was enqueued
    total: int  # images (score) or training images (fit) the job covers; 0 for fits until they run
    skipped: int = 0  # images left out because they already have a result for the model version
    message: str = ""


def log_scheduled(kind: str, scheduled: ScheduledJob, **fields: object) -> None:
    """The `event=job_scheduled` line of a job that scheduling created or found."""
    log_event(logger, logging.INFO, "job_scheduled", job=scheduled.job_id, product=scheduled.product,
              kind=kind, created=scheduled.created, images=scheduled.total, skipped=scheduled.skipped,
              **fields, note=scheduled.message or None)


def nightly_key(product: str, day: date, version: int) -> str:
    """The idempotency key of a nightly run: one job per (product, date, model version)."""
    return f"nightly:{product}:{day.isoformat()}:v{version}"


RAMP_SMALLEST = 8  # first and last chunk of a large job
RAMP_MIN_CHUNKS = 4  # jobs of fewer than this many full chunks are cut evenly


def chunk_sizes(n: int, size: int) -> list[int]:
    """Chunk lengths for `n` images with chunks of at most `size`.

    A job of at least `RAMP_MIN_CHUNKS` full chunks starts and ends with smaller chunks (8, 16, 32 ...
    up to `size`, and the same down again): the first results arrive after a few images instead of a
    whole chunk (while each worker also loads its model), and at the end no worker sits idle while
    another finishes a full chunk. Smaller jobs are cut into equal chunks of `size` (the last shorter).
    """
    ramp = []
    step = RAMP_SMALLEST
    while step < size:
        ramp.append(step)
        step *= 2
    if not ramp or n < RAMP_MIN_CHUNKS * size:
        return [min(size, n - i) for i in range(0, n, size)]
    middle = n - 2 * sum(ramp)
    full, rest = divmod(middle, size)
    return ramp + [size] * full + ([rest] if rest else []) + ramp[::-1]


def chunked(items: Sequence[str], size: int) -> list[list[str]]:
    """`items` in order, cut as `chunk_sizes` says."""
    chunks, start = [], 0
    for length in chunk_sizes(len(items), size):
        chunks.append(list(items[start : start + length]))
        start += length
    return chunks


NO_NEW_IMAGES = "no new images to score under"  # the note of a score job created with nothing to do


def new_score_job(product_id: int, version_id: int, images_uri: str, total: int, *,
                  run_date: date | None = None, enqueued_by: str, key: str | None = None) -> Job:
    """An uncommitted score job; with no images it is created succeeded, saying so in `error`."""
    job = Job(kind=JobKind.SCORE.value, product_id=product_id, model_version_id=version_id,
              images_uri=images_uri, run_date=run_date, total=total, enqueued_by=enqueued_by,
              idempotency_key=key)
    if total == 0:
        now = utcnow()
        job.status, job.created_at, job.started_at, job.finished_at = JobStatus.SUCCEEDED.value, now, now, now
        job.error = f"{NO_NEW_IMAGES} {images_uri}"
    return job


def new_fit_job(product: Product, enqueued_by: str) -> Job:
    return Job(kind=JobKind.FIT.value, product_id=product.id, images_uri=product.train_uri,
               enqueued_by=enqueued_by)


def send_chunks(job_id: int, image_uris: Sequence[str], chunk_size: int | None = None) -> int:
    """Send `score_chunk` tasks for the images (queue `score`); returns the number of chunks.

    Each send retries while the broker is unreachable (`TOTALRECALL_ENQUEUE_RETRY_SECONDS`), then raises.
    """
    chunks = chunked(image_uris, chunk_size or get_settings().chunk_size)
    for chunk in chunks:
        send_with_retry(lambda chunk=chunk: send_task(score_chunk, job_id, chunk))
    return len(chunks)


def send_task(task: Task, *args: object) -> None:
    """Send `task(*args)` without time limits in the message, so each worker applies its own
    (`TOTALRECALL_SCORE_*` / `TOTALRECALL_FIT_*TIME_LIMIT` of the worker, not of the sender)."""
    task.apply_async(args, time_limit=None, soft_time_limit=None)


def send_with_retry(send: Callable[[], object]) -> None:
    """`send()`, again every 2 s while the broker is unreachable, for `TOTALRECALL_ENQUEUE_RETRY_SECONDS`.

    (kombu's own retries give up after the connect timeout when the first connection cannot be made.)
    """
    deadline = time.monotonic() + get_settings().enqueue_retry_seconds
    while True:
        try:
            send()
            return
        except BrokerError as exc:
            if time.monotonic() >= deadline:
                raise
            pause = min(2.0, max(0.0, deadline - time.monotonic()))
            log_event(logger, logging.WARNING, "broker_unreachable", error=str(exc), retry_in=pause)
            time.sleep(pause)


def enqueue_score(job_id: int, image_uris: Sequence[str], chunk_size: int | None = None) -> int:
    """Send the job's images as `score_chunk` tasks; if that fails, fail the job (see `_send`)."""
    count = 0

    def send() -> None:
        nonlocal count
        count = send_chunks(job_id, image_uris, chunk_size)

    _send(job_id, send)
    if get_settings().tasks_in_process:
        from scheduler.recovery import settle_in_process

        settle_in_process(job_id)
    return count


def enqueue_fit(job_id: int) -> None:
    """Send a `fit_product` task (queue `fit`)."""
    _send(job_id, lambda: send_with_retry(lambda: send_task(fit_product, job_id)))


def _send(job_id: int, send: Callable[[], object]) -> None:
    """Run `send`; if the broker cannot be reached, fail the job and free its idempotency key.

    Freeing the key lets the next scheduler run create a fresh job instead of finding this one.
    """
    try:
        with log_context(job=job_id):
            send()
    except BrokerError as exc:
        message = redact_text(f"could not enqueue: {exc}")
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(
                status=JobStatus.FAILED.value, error=message, idempotency_key=None, finished_at=utcnow()))
        log_event(logger, logging.ERROR, "job_failed", job=job_id, error=message)
        raise SchedulingError(f"job {job_id}: {message}") from exc


# In-process, a score job with nothing recorded for this many times a chunk's hard time limit is abandoned
# (in-process chunks have no time limit: the margin covers a slow one)
ABANDONED_AFTER_LIMITS = 2
ABANDONED = ("abandoned: it was run in-process (no broker) and nothing was recorded for it for {} s: the command "
             "that ran it stopped (for a nightly job, `totalrecall nightly --date D` schedules its date again)")


def fail_if_abandoned(session: Session, job: Job) -> Job | None:
    """In-process (no broker), a score job is run by the command that created it, which records results
    chunk by chunk; one with nothing recorded for ABANDONED_AFTER_LIMITS x the chunk's hard time limit was
    left by a command that stopped (killed, its machine restarted), and nothing else will ever finish it:
    it is marked failed, and returned (None: it is not). With workers the recovery sweep finds such work."""
    settings = get_settings()
    if not settings.tasks_in_process or job.kind != JobKind.SCORE.value \
            or job.status not in UNFINISHED:
        return None
    limit = ABANDONED_AFTER_LIMITS * settings.score_time_limits[1]
    locked = locked_job(session, job.id)  # decided under the lock: no chunk of it records meanwhile
    if locked is None or locked.status not in UNFINISHED:
        return None
    if quiet_for(session, locked) <= timedelta(seconds=limit):
        return None
    return fail_locked_job(session, job.id, ABANDONED.format(limit))


def quiet_for(session: Session, job: Job) -> timedelta:
    """How long since anything happened to the job: its creation, its start or its last result."""
    last = session.scalar(select(func.max(Result.created_at)).where(Result.job_id == job.id))
    return utcnow() - max(t for t in (job.created_at, job.started_at, last) if t is not None)
