"""Celery tasks: thin wrappers that take ids and keys (never image bytes) and are safe to run twice.

The work itself (`workers.fitting`, `workers.scoring`) is imported when a task runs, so a scheduler or the
CLI can enqueue tasks without loading torch.

Failure policy (with a broker; in-process there is no broker to retry on, so every error fails the job):
- transient trouble (storage not answering, database unreachable or restarting, broker errors, a
  worker's disk or memory running out while it loads a model)
  retries the task with exponential backoff and jitter, up to `MAX_RETRIES` times. A score chunk that is
  still failing then records a failed row with the reason for each of its images, so the job completes;
  a fit fails its job.
- a chunk whose worker died `MAX_INTERRUPTIONS` times while running it (killed, crashed, out of memory, or
  stopped by the hard time limit, e.g. stuck in native code where the soft limit cannot interrupt it) is
  not tried again: its images get failed rows saying so (a fit fails its job). Deliveries are counted in
  Redis per task id (`workers.broker.count_delivery`); a chunk past its hard limit goes back to the queue
  under the same id (`acks_on_timeout=False`) so it is counted, instead of being acknowledged, lost and
  sent again without limit by the recovery sweep under a new id.
- any other error (a model that cannot be loaded, storage refusing the outputs or the training images,
  a missing job, a bug) marks the job failed with a secret-free message and re-raises, so Celery logs it.
- the soft time limit: a chunk records what it finished and fails the rest (`workers.scoring`); a fit fails
  its job.
- the nightly inspection retries itself, for the same day, while the database, storage or broker does not
  answer (`nightly_inspection`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import date
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init

from common.logs import log_event
from common.settings import get_settings
from workers.app import FIT_TASK, NIGHTLY_TASK, SCORE_TASK, app
from workers.job_state import describe_error, is_transient, mark_failed

logger = logging.getLogger(__name__)

MAX_RETRIES = 5
RETRY_BASE_SECONDS = 10
RETRY_MAX_SECONDS = 600
MAX_INTERRUPTIONS = 3
NIGHTLY_MAX_RETRIES = 12  # backoff capped at RETRY_MAX_SECONDS: up to 70 minutes of outage in all (35 on average)
INTERRUPTED = "interrupted (Ctrl-C) in the command that ran it in-process: run it again"


@worker_init.connect
def _preload_engine(**_: Any) -> None:
    """Import the engine (torch) in the worker's main process, before the pool forks its children."""
    import workers.fitting  # noqa: F401
    import workers.scoring  # noqa: F401

    for risk in get_settings().risks():
        log_event(logger, logging.WARNING, "settings_risk", risk=risk)


@worker_process_init.connect
def _preload_backbones(**_: Any) -> None:
    """Build `TOTALRECALL_PRELOAD_BACKBONES` in each pool process, in a thread (Celery gives a process
    only a few seconds to start): the first chunk of a night then loads just its bank."""
    import threading

    def start() -> None:
        try:
            log_compute()
        except Exception as exc:  # e.g. a CUDA device that fails to initialise: the preload still runs
            log_event(logger, logging.WARNING, "worker_compute_unknown", error=describe_error(exc))
        preload_backbones()

    threading.Thread(target=start, name="totalrecall-preload", daemon=True).start()


def log_compute() -> None:
    """Say what this pool process computes on: a GPU worker whose kNN search ran on its CPU scored 15-39
    images/s instead of 273-301 (docs/benchmarks.md section 11), which nothing else would show."""
    import faiss
    import torch

    from common.engine.knn import flat_search
    from common.engine.patchcore import resolve_device

    device = resolve_device("auto")
    cuda = device.type == "cuda"
    log_event(logger, logging.INFO, "worker_compute", device=device,
              gpu=torch.cuda.get_device_name(device) if cuda else None, torch=torch.__version__,
              cuda=torch.version.cuda if cuda else None, faiss=faiss.__version__,
              exact_search=flat_search(cuda))  # IVF indexes search on the CPU without faiss-gpu


def preload_backbones() -> None:
    """Build and keep the configured backbones on this process's device; a failure is only logged."""
    from common.engine.backbone_cache import pin_backbone
    from common.engine.patchcore import resolve_device

    device = resolve_device("auto")
    for name in get_settings().preload_backbones:
        started = time.monotonic()
        try:
            pin_backbone(name, device)
            log_event(logger, logging.INFO, "backbone_preloaded", backbone=name, device=device,
                      seconds=time.monotonic() - started)
        except Exception as exc:  # e.g. weights not installed: models load it themselves (and say why)
            log_event(logger, logging.WARNING, "backbone_preload_failed", backbone=name, device=device,
                      error=describe_error(exc))


def retry_countdown(retries: int) -> float:
    """Exponential backoff with full jitter: up to 10 s, 20 s, 40 s ... capped at 10 min."""
    return random.uniform(0, min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2**retries))


def interruptions(task: Task) -> int:
    """How often this task was started before without finishing (its worker died), retries excluded."""
    from workers.broker import count_delivery

    if task.request.is_eager:
        return 0
    return max(0, count_delivery(task.request.id) - 1 - task.request.retries)


def _can_retry(task: Task, exc: BaseException) -> bool:
    return not task.request.is_eager and is_transient(exc)


def _retry(task: Task, exc: BaseException) -> Exception:
    """Celery's Retry for `task` (raised by `task.retry` itself; Celery logs "Retry in N s")."""
    return task.retry(exc=exc, countdown=retry_countdown(task.request.retries))


def _mark_failed_quietly(fail: Callable[[int, str], str | None], job_id: int, error: str) -> None:
    """`fail(job_id, error)` (returns the job's product if it marked the job failed), logged."""
    try:
        product = fail(job_id, error)
    except Exception as exc:  # e.g. the database is down too: the recovery sweep will see the job
        log_event(logger, logging.ERROR, "job_failure_not_recorded", job=job_id, error=error,
                  cause=describe_error(exc))
        return
    if product is not None:
        log_event(logger, logging.ERROR, "job_failed", job=job_id, product=product, error=error)


@app.task(bind=True, name=FIT_TASK, max_retries=MAX_RETRIES)
def fit_product(self: Task, job_id: int) -> dict[str, Any] | None:
    """Fit the job's product and publish the model version (see `workers.fitting`)."""
    from workers import fitting

    interrupted = interruptions(self)
    if interrupted >= MAX_INTERRUPTIONS:
        _mark_failed_quietly(fitting.fail_fit, job_id, f"fit abandoned: it was started {interrupted + 1} "
                             "times and its worker died each time (killed, crashed or out of memory)")
        return None
    try:
        outcome = fitting.fit_job(job_id)
    except KeyboardInterrupt:  # in-process, Ctrl-C: nothing will finish this job (a worker redelivers)
        if self.request.is_eager:
            _mark_failed_quietly(fitting.fail_fit, job_id, INTERRUPTED)
        raise
    except SoftTimeLimitExceeded:
        soft = get_settings().fit_time_limits[0]
        _mark_failed_quietly(fitting.fail_fit, job_id, f"the fit hit its soft time limit ({soft} s)")
        raise
    except Exception as exc:
        if _can_retry(self, exc):
            if self.request.retries < MAX_RETRIES:
                raise _retry(self, exc) from exc
            _mark_failed_quietly(fitting.fail_fit, job_id,
                                 f"{describe_error(exc)} (still failing after {MAX_RETRIES} retries)")
            raise
        _mark_failed_quietly(fitting.fail_fit, job_id, describe_error(exc))
        raise
    return asdict(outcome) if outcome else None


@app.task(bind=True, name=SCORE_TASK, max_retries=MAX_RETRIES, acks_on_timeout=False)
def score_chunk(self: Task, job_id: int, image_uris: list[str]) -> dict[str, int]:
    """Score one chunk of a score job (see `workers.scoring`)."""
    from workers import scoring

    interrupted = interruptions(self)
    if interrupted >= MAX_INTERRUPTIONS:
        reason = (f"not scored: the chunk was started {interrupted + 1} times and never finished (its worker "
                  "killed, crashed, out of memory, or stopped at the hard time limit)")
        return asdict(scoring.give_up(job_id, image_uris, reason))  # logs event=chunk_given_up
    deadline = None if self.request.is_eager else scoring.chunk_deadline()
    try:
        return asdict(scoring.score_chunk(job_id, image_uris, deadline))
    except KeyboardInterrupt:  # in-process, Ctrl-C: its other chunks will not run either (a worker redelivers)
        if self.request.is_eager:
            _mark_failed_quietly(mark_failed, job_id, INTERRUPTED)
        raise
    except SoftTimeLimitExceeded:  # outside the scoring loop (e.g. writing rows): the images fail, not the job
        soft = get_settings().score_time_limits[0]
        return asdict(scoring.give_up(job_id, image_uris, f"not scored: the chunk hit its soft time limit "
                                                          f"({soft} s)"))
    except Exception as exc:
        if _can_retry(self, exc):
            if self.request.retries < MAX_RETRIES:
                raise _retry(self, exc) from exc
            # Out of retries: the images fail with the reason, so the job still completes. If even that
            # cannot be written, the chunk is lost for now and the recovery sweep sends it again.
            reason = f"not scored: {describe_error(exc)} (still failing after {MAX_RETRIES} retries)"
            return asdict(scoring.give_up(job_id, image_uris, reason))
        _mark_failed_quietly(mark_failed, job_id, describe_error(exc))
        raise


@app.task(bind=True, name=NIGHTLY_TASK, max_retries=NIGHTLY_MAX_RETRIES)
def nightly_inspection(self: Task, run_date: str | None = None, products: list[str] | None = None) -> dict[str, Any]:
    """Schedule the nightly inspection for `run_date` (YYYY-MM-DD; default: the day before the most
    recent scheduled time, `TOTALRECALL_NIGHTLY_AT` UTC, so a run that waited past midnight in the queue
    inspects the day beat sent it for).

    If the database, storage or broker does not answer (for the whole run, or for some products' archives),
    the run is tried again with backoff (`NIGHTLY_MAX_RETRIES`: up to about 70 minutes in all) for the same
    day and only the products that could not be scheduled (`products`); the others keep their jobs."""
    from scheduler.nightly import schedule_nightly, scheduled_day  # the scheduler imports these tasks

    day = date.fromisoformat(run_date) if run_date else scheduled_day(get_settings().nightly_time)
    retries = self.request.retries
    try:
        run = schedule_nightly(day, enqueued_by="beat", products=products)
    except Exception as exc:
        if _can_retry(self, exc) and retries < NIGHTLY_MAX_RETRIES:
            log_event(logger, logging.WARNING, "nightly_retry", day=day, error=describe_error(exc))
            raise self.retry(exc=exc, args=(day.isoformat(), products), countdown=retry_countdown(retries)) \
                from exc
        raise
    if run.retry and not self.request.is_eager and retries < NIGHTLY_MAX_RETRIES:
        log_event(logger, logging.WARNING, "nightly_retry", day=day, products=",".join(run.retry))
        raise self.retry(args=(day.isoformat(), run.retry), countdown=retry_countdown(retries))
    return asdict(run) | {"day": run.day.isoformat()}  # the scheduler logged each product's outcome
