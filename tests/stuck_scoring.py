"""Loaded into a real `celery worker` by `--include tests.stuck_scoring` (test_faults.py): scoring an image
whose name contains "stuck" hangs with the soft-time-limit signal blocked, as a chunk stuck in native
code does, so only the hard time limit can stop it."""

from __future__ import annotations

import signal
import time
from typing import Any

from workers import scoring

_score_chunk = scoring.score_chunk


def _score_or_hang(job_id: int, image_uris: list[str], *args: Any, **kwargs: Any) -> Any:
    if any("stuck" in uri for uri in image_uris):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # billiard's soft time limit signal
        time.sleep(3600)
    return _score_chunk(job_id, image_uris, *args, **kwargs)


scoring.score_chunk = _score_or_hang
