"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal is handled. If that
is a finalizer (a `__del__` or a weakref callback run by the garbage collector), Python prints "Exception
ignored in ..." and goes on: the command would finish its job and exit 0 as if Ctrl-C had not been
pressed. `keep_interrupts` delivers such an interrupt again, to be raised in the command's own code.
"""

from __future__ import annotations

import _thread
import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

REDELIVERY_DELAY_S = 0.01


@contextlib.contextmanager
def keep_interrupts() -> Iterator[None]:
    """While active, a KeyboardInterrupt swallowed by a finalizer is raised again a moment later."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # As if SIGINT arrived again, a moment later: called here, the handler would raise inside this
            # hook, where it is ignored too. Should it land in another finalizer, this hook runs again.
            timer = threading.Timer(REDELIVERY_DELAY_S, _thread.interrupt_main)
            timer.daemon = True
            timer.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
