"""The workers' sweep for lost work (see `scheduler.recovery`).

Every `TOTALRECALL_RECOVERY_INTERVAL` seconds each worker's main process tries to take a cluster-wide lock
in Redis; the one that gets it runs the sweep on a background thread, so the worker's event loop never
waits for the database, the broker or storage. A second lock, held while a sweep runs, keeps a sweep
that outlasts the interval (listing large folders) from running next to the next one. A sweep that fails is logged and tried again next time.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

from common.logs import log_event
from common.settings import get_settings
from workers.job_state import describe_error
from workers.periodic import PeriodicStep

logger = logging.getLogger(__name__)
RUNNING_LOCK = "recovery:running"  # held while a sweep runs; expires after RUNNING_INTERVALS intervals if its
RUNNING_INTERVALS = 10  # worker dies mid-sweep


class RecoveryStep(PeriodicStep):
    """Worker bootstep that runs `sweep` every `TOTALRECALL_RECOVERY_INTERVAL` seconds (not in-process)."""

    thread_name = "totalrecall-recovery"
    owner = "worker"

    def interval(self, parent: Any) -> float | None:
        settings = get_settings()
        if settings.tasks_in_process:
            return None
        self.owner = str(getattr(parent, "hostname", None) or "worker")
        return settings.recovery_interval

    def work(self) -> None:
        sweep(self.owner)


def sweep(owner: str) -> list[Any]:
    """One sweep if this process gets the lock; returns what was sent again (never raises)."""
    from scheduler.recovery import recover_lost_work
    from workers.broker import release_lock, try_lock

    settings = get_settings()
    token = f"{owner}:{uuid.uuid4().hex}"
    try:
        if not try_lock("recovery", settings.recovery_interval, owner):
            return []  # another worker's turn this interval
        if not try_lock(RUNNING_LOCK, RUNNING_INTERVALS * settings.recovery_interval, token):
            return []  # a sweep started earlier is still running (a slow listing): not two at once
        try:
            recovered = recover_lost_work()
        finally:
            with contextlib.suppress(Exception):  # Redis gone meanwhile: the lock expires by itself
                release_lock(RUNNING_LOCK, token)
    except Exception as exc:  # the broker or the database is down: next time
        log_event(logger, logging.WARNING, "recovery_sweep_failed", owner=owner, error=describe_error(exc),
                  retry_in=settings.recovery_interval)
        return []
    for item in recovered:
        log_event(logger, logging.WARNING, "work_recovered", **item.log_fields())
    return recovered
