"""Job status transitions made by the workers.

Progress counters are recounted from the results table, never incremented, so a redelivered or retried
chunk cannot count twice. The job row is locked (`SELECT ... FOR UPDATE`) before counting: on PostgreSQL
the count then runs after any concurrent chunk of the same job has committed and sees its rows.

Every transition runs through `in_transaction`, so a database restart in the middle is retried; all of them
are safe to run twice. A succeeded job is never marked failed (a late duplicate of a finished task).
"""

from __future__ import annotations

import errno
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from common.db import (
    UNFINISHED,
    Job,
    JobKind,
    JobStatus,
    Result,
    ResultStatus,
    in_chunks,
    in_transaction,
    is_transient_db_error,
    record_results,
    utcnow,
)
from common.drift import drift_warning
from common.logs import log_event
from common.settings import get_settings, redact_text
from common.storage import StorageUnavailable

MAX_ERROR_CHARS = 2000
logger = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of `exc` for the jobs table."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return redact_text(text)[:MAX_ERROR_CHARS]


class WorkerShortOfResources(RuntimeError):
    """This worker could not load the model for lack of disk space or memory: not the model's fault, so the
    chunk is retried (on any worker) instead of failing the job."""


# errno values of a full disk or exhausted memory on the worker itself
_SHORT_OF = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM)


def short_of_resources(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is the worker's disk or memory running out."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
                or (isinstance(exc, OSError) and exc.errno in _SHORT_OF):  # torch.cuda.OutOfMemoryError
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying later: storage, database or broker not answering, or a worker short
    of disk or memory for the model (`WorkerShortOfResources`: the retry may go to another worker)."""
    return isinstance(exc, StorageUnavailable | BrokerError | WorkerShortOfResources) or is_transient_db_error(exc)


def name_failures(failures: Sequence[dict[str, Any]], uris: Sequence[str]) -> list[dict[str, Any]]:
    """The engine's failure records (`position` in the images it was given, `error`) named by URI."""
    return [{"uri": uris[f["position"]], "error": f["error"]} for f in failures]


def mark_running(job_id: int) -> None:
    """queued -> running (first start time kept); other states are left alone."""
    in_transaction(lambda session: session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, started_at=utcnow())
    ))


def mark_failed(job_id: int, error: str) -> str | None:
    """Mark the job failed with `error`, unless it has already succeeded; its product's name if it did."""

    def work(session: Session) -> str | None:
        job = fail_locked_job(session, job_id, error)
        return job.product.name if job is not None else None

    return in_transaction(work)


def fail_locked_job(session: Session, job_id: int, error: str) -> Job | None:
    """Lock the job and mark it failed with `error`; None (and nothing changed) if it is missing or has
    succeeded already."""
    job = locked_job(session, job_id)
    if job is None or job.status == JobStatus.SUCCEEDED.value:
        return None
    job.status, job.error, job.finished_at = JobStatus.FAILED.value, error, utcnow()
    job.started_at = job.started_at or job.finished_at
    return job


def lock_job(session: Session, job_id: int) -> Job:
    """The job's row, locked until the transaction ends (`locked_job`); LookupError if there is none."""
    job = locked_job(session, job_id)
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    return job


def locked_job(session: Session, job_id: int) -> Job | None:
    """The job's row (None if there is none), locked until the transaction ends: no other transaction
    writes it meanwhile.

    SQLite has no row locks, and Python's sqlite3 begins a transaction only at the first write, so reads
    before it see data another writer may change before this one commits: a write comes first there,
    which takes SQLite's one write lock (waiting up to its busy timeout) for the whole transaction."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Job).where(Job.id == job_id).values(status=Job.status)
                        .execution_options(synchronize_session=False))
    return session.get(Job, job_id, with_for_update=True)


def record_chunk(job_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Write a chunk's result rows and recount its job, in one transaction (retried if interrupted);
    the chunk that finishes a drifted job logs `score_drift`.

    A row that replaces another job's failed result (an ad-hoc job scoring an image again) moves that
    image to this job: the earlier job's total and counts drop by it, so every job's counts stay those of
    its own rows. Only an unfinished job takes images so; a finished one's rows for them are not written."""

    def work(session: Session) -> tuple[dict[int, int], list[Drift]]:
        job = lock_job(session, job_id)
        writing = rows
        superseded = superseded_failures(session, job_id, rows)
        if superseded and job.status not in UNFINISHED:
            # A finished job takes nothing back (a chunk of it redelivered after another job re-scored its
            # failed images): its counts are complete, and the image would count in both jobs.
            taken = {uri for uris in superseded.values() for uri in uris}
            writing = [row for row in rows if row["image_uri"] not in taken]
            superseded = {}
        moved = {other: len(uris) for other, uris in superseded.items()}
        # PostgreSQL: a deadlock with a chunk of one of those jobs is possible, and retried (in_transaction)
        earlier = [lock_job(session, other) for other in sorted(moved)]
        record_results(session, writing)
        drifted = [refresh_counts(session, job)]
        for other in earlier:
            other.total -= moved[other.id]
            if other.status in UNFINISHED:  # it may finish now: its remaining images have rows
                drifted.append(refresh_counts(session, other))
            else:  # a finished job keeps its outcome; only its counts follow its rows
                count_results(session, other)
        return moved, [d for d in drifted if d is not None]

    moved, drifted = in_transaction(work)
    for other, images in sorted(moved.items()):
        log_event(logger, logging.INFO, "results_moved", job=other, to_job=job_id, images=images)
    log_drift(drifted)


def superseded_failures(session: Session, job_id: int, rows: Sequence[dict[str, Any]]) -> dict[int, list[str]]:
    """{job id: image URIs} of the other jobs' failed results that `rows` would replace (rows locked)."""
    moved: dict[int, list[str]] = {}
    for version_id in {row["model_version_id"] for row in rows}:
        uris = [row["image_uri"] for row in rows if row["model_version_id"] == version_id]
        for part in in_chunks(uris):
            for other, uri in session.execute(
                select(Result.job_id, Result.image_uri).where(
                    Result.model_version_id == version_id,
                    Result.image_uri.in_(part),
                    Result.status == ResultStatus.FAILED.value,
                    Result.job_id != job_id,
                ).with_for_update()
            ):
                moved.setdefault(other, []).append(uri)
    return moved


def count_results(session: Session, job: Job) -> None:
    """Set the job's done/failed from its result rows."""
    ok = func.count().filter(Result.status == ResultStatus.OK.value)
    failed = func.count().filter(Result.status == ResultStatus.FAILED.value)
    job.done, job.failed = session.execute(select(ok, failed).where(Result.job_id == job.id)).one()


@dataclass(frozen=True)
class Drift:
    """A score job that finished with a drift warning (`record_drift`), for `log_drift` after commit."""

    job_id: int
    median_score: float | None
    warning: str


def refresh_counts(session: Session, job: Job) -> Drift | None:
    """Recount done/failed from this job's result rows; the job succeeds once every image has a row.
    Returns its drift warning when this call finished the job and the run drifted: the caller logs it
    (`log_drift`) once the transaction has committed, whichever path finished the job.

    Call with the job row locked (`lock_job`) in the transaction that wrote the rows.
    """
    count_results(session, job)
    if job.done + job.failed >= job.total and job.status != JobStatus.SUCCEEDED.value:
        if job.status == JobStatus.FAILED.value:  # a retry completed what an earlier attempt did not
            job.error = None
        job.status, job.finished_at = JobStatus.SUCCEEDED.value, utcnow()
        job.started_at = job.started_at or job.finished_at
        record_drift(session, job)
        if job.warning is not None:
            return Drift(job.id, job.median_score, job.warning)
    return None


def log_drift(drifted: Sequence[Drift]) -> None:
    """The `score_drift` WARNING of each job that finished drifted (alerts hang on it, README)."""
    for d in drifted:
        log_event(logger, logging.WARNING, "score_drift", job=d.job_id, median_score=d.median_score,
                  warning=d.warning)


def record_drift(session: Session, job: Job) -> None:
    """A finished score job's median image score and, if the run drifted from the model's nominal
    scores, its warning (`common.drift`). The middle score (the mean of the two middle ones for an even
    count, as for the nominal reference) is read with ORDER BY ... OFFSET, the same on SQLite and
    PostgreSQL."""
    if job.kind != JobKind.SCORE.value or not job.done:
        return
    scores = select(Result.score).where(Result.job_id == job.id, Result.status == ResultStatus.OK.value)
    middle = session.scalars(scores.order_by(Result.score).offset((job.done - 1) // 2).limit(2 - job.done % 2))
    values = middle.all()  # empty only if the counts ran ahead of the rows
    job.median_score = statistics.median(values) if values else None
    version = job.model_version
    job.warning = drift_warning(job.median_score, version and version.nominal_median_score,
                                version and version.image_threshold, get_settings().drift_level)
