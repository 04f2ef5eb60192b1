"""Worker bootsteps that run a piece of housekeeping every so often, on a thread of their own, so the
worker's event loop never waits for the database, the broker, storage or the disk."""

from __future__ import annotations

import threading
from typing import Any

from celery import bootsteps


class PeriodicStep(bootsteps.StartStopStep):
    """Runs `work` every `interval(parent)` seconds on the worker's timer (None: not at all); a run still
    going when the next one is due is not doubled."""

    requires = ("celery.worker.components:Timer",)
    thread_name = "totalrecall-periodic"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.thread: threading.Thread | None = None

    def interval(self, parent: Any) -> float | None:
        raise NotImplementedError

    def work(self) -> None:
        raise NotImplementedError

    def start(self, parent: Any) -> None:
        seconds = self.interval(parent)
        if seconds is not None:
            self.tref = parent.timer.call_repeatedly(seconds, self.tick, priority=10)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def tick(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.thread = threading.Thread(target=self.work, name=self.thread_name, daemon=True)
        self.thread.start()
