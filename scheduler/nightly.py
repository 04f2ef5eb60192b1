"""The nightly inspection: score yesterday's archive of every product with an active model.

One job per (product, date, model version), guarded by the unique `jobs.idempotency_key`: a second run for
the same date (or two schedulers racing) finds the existing job and enqueues nothing, unless that job
failed or found no images: then it gives up its key and the run schedules the date again (a repaired
model, or images uploaded late). In-process, so does an unfinished job that the command running it left
(`scheduler.jobs.fail_if_abandoned`): it is marked failed first. Images that already have a result for the
model version are left out.
Chunks are enqueued product by product, so a worker takes consecutive chunks of one product and loads few
models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from common.db import Job, JobStatus, Product, date_scored, images_with_results, session_scope
from common.images import IMAGE_SUFFIXES
from common.logs import log_context, log_event
from common.settings import redact_text
from common.storage import StorageError, list_uris
from scheduler.jobs import (
    NO_NEW_IMAGES,
    ScheduledJob,
    enqueue_score,
    fail_if_abandoned,
    log_scheduled,
    new_score_job,
    nightly_key,
)
from scheduler.products import SchedulingError, active_version
from workers.job_state import describe_error, is_transient

logger = logging.getLogger(__name__)

CLOCK_SKEW = timedelta(minutes=10)  # how far a worker's clock may be behind beat's


@dataclass(frozen=True)
class _Target:
    product: str
    product_id: int
    version_id: int
    version: int
    archive_uri: str


@dataclass
class NightlyRun:
    day: date
    jobs: list[ScheduledJob] = field(default_factory=list)
    without_model: list[str] = field(default_factory=list)  # products skipped: no active model
    errors: dict[str, str] = field(default_factory=dict)  # product -> why it could not be scheduled
    retry: list[str] = field(default_factory=list)  # those of them whose error was transient (storage down)


def yesterday_utc() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


def scheduled_day(nightly_at: tuple[int, int], now: datetime | None = None) -> date:
    """The day that the most recent scheduled nightly (daily at `nightly_at` UTC, at or before `now` give
    or take `CLOCK_SKEW`) inspects: the day before it fired. A beat task that waited in the queue past
    midnight still inspects the day it was sent for (as long as it waited less than a day less the skew),
    and a worker whose clock is a little behind beat's takes a task sent at 02:00:00 for today's, not
    yesterday's, and one sent at 00:00:00 while its own clock still reads 23:59 for tomorrow's."""
    now = now or datetime.now(UTC)
    fired = now.astimezone(UTC).replace(hour=nightly_at[0], minute=nightly_at[1], second=0, microsecond=0)
    if fired + timedelta(days=1) <= now + CLOCK_SKEW:  # beat's clock is past midnight already
        fired += timedelta(days=1)
    elif fired > now + CLOCK_SKEW:
        fired -= timedelta(days=1)
    return fired.date() - timedelta(days=1)


def schedule_nightly(day: date | None = None, enqueued_by: str = "nightly",
                     products: Sequence[str] | None = None) -> NightlyRun:
    """Create and enqueue the nightly jobs for `day` (default: yesterday, UTC); `products`: only those
    (a retry of the products whose scheduling failed), default all.

    A product whose archive cannot be listed (or whose tasks cannot be sent) is reported in `errors`, and
    also in `retry` when the cause was transient (the `nightly_inspection` task then runs again for them).
    """
    run = NightlyRun(day or yesterday_utc())
    for target in _targets(run):
        if products is not None and target.product not in products:
            continue
        try:
            with log_context(product=target.product):
                run.jobs.append(_schedule(target, run.day, enqueued_by))
        except Exception as exc:  # e.g. a missing bucket, or (in-process) a task's error: the others go on
            known = isinstance(exc, (StorageError, SchedulingError))
            run.errors[target.product] = redact_text(str(exc)) if known else describe_error(exc)
            if is_transient(exc):
                run.retry.append(target.product)
            log_event(logger, logging.ERROR, "nightly_product_not_scheduled", day=run.day,
                      product=target.product, error=run.errors[target.product])
    log_event(logger, logging.INFO, "nightly_scheduled", day=run.day, jobs=len(run.jobs),
              created=sum(s.created for s in run.jobs), images=sum(s.total for s in run.jobs if s.created),
              without_model=len(run.without_model), errors=len(run.errors), enqueued_by=enqueued_by)
    return run


def _targets(run: NightlyRun) -> list[_Target]:
    targets = []
    with session_scope() as session:
        for product in session.scalars(select(Product).order_by(Product.name)):
            version = active_version(session, product)
            if version is None:
                run.without_model.append(product.name)
                continue
            targets.append(_Target(product.name, product.id, version.id, version.version,
                                   product.archive_uri(run.day)))
    return targets


def _schedule(target: _Target, day: date, enqueued_by: str) -> ScheduledJob:
    key = nightly_key(target.product, day, target.version)
    existing = _existing(key, target, release=True)
    if existing is not None:
        return existing
    uris = list_uris(target.archive_uri, IMAGE_SUFFIXES)
    try:
        with session_scope() as session:
            scored = images_with_results(session, target.version_id, uris)
            todo = [u for u in uris if u not in scored]
            date_scored(session, target.version_id, sorted(scored), day)
            job = new_score_job(target.product_id, target.version_id, target.archive_uri, len(todo),
                                run_date=day, enqueued_by=enqueued_by, key=key)
            session.add(job)
            session.flush()
            job_id, message = job.id, job.error or ""
    except IntegrityError:  # another scheduler created this run's job between our check and insert
        existing = _existing(key, target)
        if existing is None:
            raise
        return existing
    scheduled = ScheduledJob(target.product, job_id, True, len(todo), len(scored), message)
    log_scheduled("score", scheduled, day=day, version=target.version)
    if todo:
        enqueue_score(job_id, todo)
    return scheduled


def _existing(key: str, target: _Target, release: bool = False) -> ScheduledJob | None:
    """The job holding `key`, or None when there is none; with `release`, also None when it failed or
    found no images, after taking the key from it so that this run schedules the date again."""
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()
        if job is None:
            return None
        if release:
            job = fail_if_abandoned(session, job) or job
        if release and _rerunnable(job):
            released = session.execute(
                update(Job).where(Job.id == job.id, Job.idempotency_key == key)
                .values(idempotency_key=None)).rowcount
            log_event(logger, logging.INFO, "nightly_rescheduled", job=job.id, status=job.status,
                      total=job.total, released=bool(released))
            return None
        scheduled = ScheduledJob(target.product, job.id, False, job.total,
                                 message=f"already scheduled as job {job.id} ({job.status}): nothing enqueued")
    log_scheduled("score", scheduled, version=target.version)
    return scheduled


def _rerunnable(job: Job) -> bool:
    """A failed nightly job, or one that found nothing to score, does not hold its date. (A job left with
    no image because other jobs scored its failed ones again does: its night was inspected.)"""
    found_nothing = job.total == 0 and (job.error or "").startswith(NO_NEW_IMAGES)
    return job.status == JobStatus.FAILED or (job.status == JobStatus.SUCCEEDED and found_nothing)
