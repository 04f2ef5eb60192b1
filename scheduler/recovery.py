"""Find work the broker lost and send it again: the database, not the broker, says what is done.

A score job's images are accounted for by its result rows; the images it still waits for are in queued or
unacknowledged tasks in the broker (`workers.broker.pending_work`). An image of an unfinished job that is
in neither was lost (a Redis restart without persistence, a fit dropped after its hard time limit ...)
and is sent again in new chunks. A fit job with no task in the broker is sent again, unless it has been
running for longer than the fit time limit: then it failed, and says so.

The job's total is recounted at the same time, as the images of its folder that no other job has already
scored for the model version (for a nightly job: that have no result for it at all), so a job whose
images another job scored first, or whose images were deleted meanwhile, completes too.

A job whose folder cannot be listed (a deleted bucket, revoked access) is logged (`recovery_job_failed`)
and left unfinished for the next sweep, without holding up the other jobs. Once nothing has happened to it
for UNLISTABLE_GIVE_UP and none of its work is in the broker, it is marked failed, saying why: nothing
else would ever finish it.

Only jobs older than `TOTALRECALL_RECOVERY_GRACE` are looked at: a younger job may still be sending its
tasks. Running this twice, or while tasks are running, is harmless: tasks are idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.db import UNFINISHED, Job, JobKind, Product, Result, images_with_results, in_transaction, utcnow
from common.images import IMAGE_SUFFIXES
from common.logs import log_context, log_event
from common.settings import get_settings, redact_text
from common.storage import StorageError, StorageUnavailable, list_uris
from workers.broker import PendingWork, pending_work, redis_client
from workers.job_state import Drift, fail_locked_job, lock_job, locked_job, log_drift, refresh_counts

logger = logging.getLogger(__name__)

# an unfinished job whose folder has been unlistable, with nothing recorded for it, this long is failed
UNLISTABLE_GIVE_UP = timedelta(hours=6)


@dataclass(frozen=True)
class Recovery:
    """What one sweep did for one job."""

    job_id: int
    product: str
    kind: str
    sent: int  # images sent again (score) or 1 (fit)
    total: int  # the job's total afterwards
    note: str = ""

    def log_fields(self) -> dict[str, Any]:
        """The fields of its `event=work_recovered` log line."""
        what = f"{self.sent} lost image(s) sent again" if self.kind == JobKind.SCORE.value else self.note
        return {"job": self.job_id, "product": self.product, "kind": self.kind, "sent": self.sent,
                "total": self.total, "note": what}


def recover_lost_work(client: Any = None) -> list[Recovery]:
    """One sweep over the unfinished jobs older than the grace period (see the module docstring)."""
    settings = get_settings()
    if settings.tasks_in_process:
        return []
    cutoff = utcnow() - timedelta(seconds=settings.recovery_grace)
    candidates = in_transaction(lambda s: s.execute(
        select(Job.id, Job.kind, Job.total, Job.done, Job.failed, Product.name)
        .join(Product, Product.id == Job.product_id)
        .where(Job.status.in_(UNFINISHED), Job.created_at < cutoff).order_by(Job.id)).all())
    if not candidates:
        return []
    client = client if client is not None else redis_client()
    if client is None:
        return []
    pending = pending_work(client)
    recovered = []
    for job_id, kind, total, done, failed, product in candidates:
        with log_context(job=job_id, product=product):  # e.g. a broker retry names the job
            try:
                if kind == JobKind.FIT.value:
                    outcome = _recover_fit(job_id, product, pending)
                else:
                    waiting = pending.images.get(job_id, set())
                    if done + failed + len(waiting) >= total:  # everything is recorded or on its way
                        continue
                    outcome = _recover_score(job_id, product, waiting)
            except StorageUnavailable:
                raise  # the store is down for every job: the next sweep tries them all again
            except StorageError as exc:  # this job's folder alone (a deleted bucket, access revoked)
                error = redact_text(str(exc))
                if kind == JobKind.SCORE.value and not pending.images.get(job_id) and _give_up(job_id, error):
                    continue
                log_event(logger, logging.WARNING, "recovery_job_failed", error=error,
                          retry_in=settings.recovery_interval)
                continue
        if outcome is not None:
            recovered.append(outcome)
    return recovered


def _give_up(job_id: int, error: str) -> bool:
    """Fail the score job if nothing has happened to it for UNLISTABLE_GIVE_UP (decided under its lock);
    True if it was failed."""
    from scheduler.jobs import quiet_for

    hours = UNLISTABLE_GIVE_UP.total_seconds() / 3600

    def work(session: Session) -> str | None:
        job = locked_job(session, job_id)
        if job is None or job.status not in UNFINISHED or quiet_for(session, job) <= UNLISTABLE_GIVE_UP:
            return None
        message = (f"its images folder {job.images_uri} could not be listed ({error}) and nothing was "
                   f"recorded for it for {hours:g} h: images without a result were not scored; score the "
                   "folder again once it can be read")
        return message if fail_locked_job(session, job_id, message) is not None else None

    message = in_transaction(work)
    if message is None:
        return False
    log_event(logger, logging.ERROR, "job_failed", error=message)
    return True


def settle_in_process(job_id: int) -> Recovery | None:
    """In-process (no broker), every chunk of a score job has run when sending returns. A job still
    unfinished then is short of images that another job (another command running at the same time)
    scored first: recount it now, as the sweep would with workers."""
    job = in_transaction(lambda s: s.get(Job, job_id))
    if job is None or job.status not in UNFINISHED:
        return None
    return _recover_score(job_id, "", set())


def _recover_fit(job_id: int, product: str, pending: PendingWork) -> Recovery | None:
    from scheduler.jobs import send_task, send_with_retry
    from workers.fitting import fail_fit
    from workers.tasks import fit_product

    if job_id in pending.fits:
        return None
    hard_limit = get_settings().fit_time_limits[1]
    job = in_transaction(lambda s: s.get(Job, job_id))
    if job.started_at is not None and utcnow() - job.started_at > timedelta(seconds=hard_limit):
        note = (f"the fit did not finish within its time limit ({hard_limit} s) and its task is gone; "
                "run `totalrecall fit` again")
        fail_fit(job_id, note)
        return Recovery(job_id, product, job.kind, 0, job.total, "failed: " + note)
    send_with_retry(lambda: send_task(fit_product, job_id))
    return Recovery(job_id, product, job.kind, 1, job.total, "lost fit task sent again")


def _recover_score(job_id: int, product: str, waiting: set[str]) -> Recovery | None:
    from scheduler.jobs import send_chunks

    job = in_transaction(lambda s: s.get(Job, job_id))
    listed = set(list_uris(job.images_uri, IMAGE_SUFFIXES)) if job.images_uri else set()

    def recount(session: Session) -> tuple[list[str], int, Drift | None] | None:
        locked = lock_job(session, job_id)  # no chunk of this job commits while we count
        if locked.status not in UNFINISHED:
            return None
        own = set(session.scalars(select(Result.image_uri).where(Result.job_id == job_id)))
        others = [u for u in listed | waiting if u not in own]
        taken = images_with_results(session, locked.model_version_id, others,
                                    ok_only=locked.idempotency_key is None)
        outstanding = {u for u in others if u not in taken}
        locked.total = len(own) + len(outstanding)
        drifted = refresh_counts(session, locked)
        return sorted(outstanding - waiting), locked.total, drifted

    outcome = in_transaction(recount)
    if outcome is None:
        return None
    lost, total, drifted = outcome
    log_drift([drifted] if drifted else [])
    if lost:
        send_chunks(job_id, lost)
    elif total == job.total:
        return None
    return Recovery(job_id, product, job.kind, len(lost), total)
