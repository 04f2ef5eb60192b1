"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal is handled. If that
is a finalizer (a `__del__` or a weakref callback run by the garbage collector), Python prints "Exception
ignored in ..." and goes on: the command would finish its job and exit 0 as if Ctrl-C had not been
pressed. `keep_interrupts` delivers such an interrupt again, to be raised in the command's own code.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

REDELIVERY_DELAY_S = 0.01


@contextlib.contextmanager
def keep_interrupts() -> Iterator[None]:
    """While active, a KeyboardInterrupt swallowed by a finalizer is raised again a moment later; one still
    on its way when the block ends is raised there."""
    previous = sys.unraisablehook
    pending: list[threading.Timer] = []

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # SIGINT again, a moment later and to the main thread, so that a blocking wait is interrupted
            # too: sent from here, it would be handled inside this hook, where it is ignored as well. Should
            # it land in another finalizer, this hook runs again.
            timer = threading.Timer(REDELIVERY_DELAY_S, signal.pthread_kill,
                                    (threading.main_thread().ident, signal.SIGINT))
            timer.daemon = True
            pending.append(timer)
            timer.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        waiting = [t for t in pending if not t.finished.is_set()]  # not sent yet
        for timer in waiting:
            timer.cancel()
        if waiting and sys.exc_info()[0] is None:
            raise KeyboardInterrupt
