"""Celery tasks: thin wrappers that take ids and keys (never image bytes) and are safe to run twice.

The work itself (`workers.fitting`, `workers.scoring`) is imported when a task runs, so a scheduler or the
CLI can enqueue tasks without loading torch.

Failure policy: `StorageUnavailable` (the store did not answer even after botocore's retries) retries the
task with exponential backoff (not in-process: there is no broker to retry on); any other error, or running
out of retries, marks the job failed with a secret-free message and re-raises, so Celery logs it too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict
from datetime import date
from typing import Any

from celery import Task
from celery.signals import worker_init
from celery.utils.log import get_task_logger

from common.storage import StorageUnavailable
from workers.app import FIT_TASK, NIGHTLY_TASK, SCORE_TASK, app
from workers.job_state import describe_error, mark_failed

logger = get_task_logger(__name__)

MAX_RETRIES = 5
RETRY_BASE_SECONDS = 10
RETRY_MAX_SECONDS = 600


@worker_init.connect
def _preload_engine(**_: Any) -> None:
    """Import the engine (torch) in the worker's main process, before the pool forks its children."""
    import workers.fitting  # noqa: F401
    import workers.scoring  # noqa: F401


def retry_countdown(retries: int) -> float:
    """Exponential backoff with full jitter: up to 10 s, 20 s, 40 s ... capped at 10 min."""
    return random.uniform(0, min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**retries))


def _run(task: Task, job_id: int, work: Callable[[], Any], fail: Callable[[int, str], None]) -> Any:
    try:
        return work()
    except StorageUnavailable as exc:
        # In-process (eager) there is no broker to retry later: botocore's retries were the last chance.
        if not task.request.is_eager and task.request.retries < MAX_RETRIES:
            raise task.retry(exc=exc, countdown=retry_countdown(task.request.retries)) from exc
        fail(job_id, describe_error(exc))
        raise
    except Exception as exc:
        fail(job_id, describe_error(exc))
        raise


@app.task(bind=True, name=FIT_TASK, max_retries=MAX_RETRIES)
def fit_product(self: Task, job_id: int) -> dict[str, Any] | None:
    """Fit the job's product and publish the model version (see `workers.fitting`)."""
    from workers import fitting

    outcome = _run(self, job_id, lambda: fitting.fit_job(job_id), fitting.fail_fit)
    return asdict(outcome) if outcome else None


@app.task(bind=True, name=SCORE_TASK, max_retries=MAX_RETRIES)
def score_chunk(self: Task, job_id: int, image_uris: list[str]) -> dict[str, int]:
    """Score one chunk of a score job (see `workers.scoring`)."""
    from workers import scoring

    return asdict(_run(self, job_id, lambda: scoring.score_chunk(job_id, image_uris), mark_failed))


@app.task(name=NIGHTLY_TASK)
def nightly_inspection(run_date: str | None = None) -> dict[str, Any]:
    """Schedule the nightly inspection for `run_date` (YYYY-MM-DD; default yesterday, UTC)."""
    from scheduler.nightly import schedule_nightly  # the scheduler imports these tasks

    run = schedule_nightly(date.fromisoformat(run_date) if run_date else None, enqueued_by="beat")
    for product, error in run.errors.items():
        logger.error("nightly %s: %s not scheduled: %s", run.day, product, error)
    return asdict(run) | {"day": run.day.isoformat()}
