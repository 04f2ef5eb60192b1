"""Handing freed memory back to the operating system."""

from __future__ import annotations

import contextlib
import ctypes


def release_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps large freed blocks in its per-thread arenas, so a
    process's RSS would otherwise stay at the peak of its largest piece of work (a chunk, an image decoded
    in another thread) for ever."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
