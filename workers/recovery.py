"""The workers' sweep for lost work (see `scheduler.recovery`).

Every `TOTALRECALL_RECOVERY_INTERVAL` seconds each worker's main process tries to take a cluster-wide lock
in Redis; the one that gets it runs the sweep on a background thread, so the worker's event loop never
waits for the database, the broker or storage. A sweep that fails is logged and tried again next time.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from common.logs import log_event
from common.settings import get_settings
from workers.job_state import describe_error

logger = logging.getLogger(__name__)


class RecoveryStep(bootsteps.StartStopStep):
    """Worker bootstep that schedules `sweep` on the worker's timer."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.thread: threading.Thread | None = None
        self.owner = "worker"

    def start(self, parent: Any) -> None:
        settings = get_settings()
        if settings.tasks_in_process:
            return
        self.owner = str(getattr(parent, "hostname", None) or "worker")
        self.tref = parent.timer.call_repeatedly(settings.recovery_interval, self.tick, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def tick(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.thread = threading.Thread(target=sweep, args=(self.owner,), name="totalrecall-recovery",
                                       daemon=True)
        self.thread.start()


def sweep(owner: str) -> list[Any]:
    """One sweep if this process gets the lock; returns what was sent again (never raises)."""
    from scheduler.recovery import recover_lost_work
    from workers.broker import try_lock

    settings = get_settings()
    try:
        if not try_lock("recovery", settings.recovery_interval, owner):
            return []
        recovered = recover_lost_work()
    except Exception as exc:  # the broker or the database is down: next time
        log_event(logger, logging.WARNING, "recovery_sweep_failed", owner=owner, error=describe_error(exc),
                  retry_in=settings.recovery_interval)
        return []
    for item in recovered:
        log_event(logger, logging.WARNING, "work_recovered", **item.log_fields())
    return recovered
