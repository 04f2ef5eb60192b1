"""Loaded into a real `celery worker` by `--include tests.hung_download` (test_security.py): reading a
local image whose name contains "hung" blocks, as a download from a stalled network share or endpoint
does, until a file named like it plus ".release" appears (so the worker can stop afterwards). A pipe no
longer serves: it is refused without being read."""

from __future__ import annotations

import time
from pathlib import Path

from common.storage import LocalStorage

_get_bytes = LocalStorage.get_bytes


def _get_bytes_or_hang(self: LocalStorage, key: str, max_bytes: int | None = None) -> bytes:
    if "hung" in Path(key).name:
        release = Path(str(self._path(key)) + ".release")
        deadline = time.monotonic() + 600
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return _get_bytes(self, key, max_bytes)


LocalStorage.get_bytes = _get_bytes_or_hang
