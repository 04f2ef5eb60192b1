"""A worker machine's own disk: the model cache kept within its bound, leftovers of killed tasks removed.

The on-disk model cache (`TOTALRECALL_CACHE_DIR`) holds one folder per artifact sha256, shared by the
processes of a machine. Using a model marks its folder (mtime); after each download, when a worker starts
and hourly, the least recently used folders beyond `TOTALRECALL_MODEL_DISK_CACHE_MB` are deleted, never
the most recently used one. A folder is renamed away before it is deleted, so a process never sees half
of one (one that was about to read it downloads the model again, `workers.model_cache`).

A task killed mid-way (SIGKILL, out of memory, the hard time limit) leaves what its `finally` blocks would
have deleted: a half-downloaded model (`<cache_dir>/.<sha256>-*`) and a fit's scratch folders in TMPDIR
(`totalrecall-fit-*`, `-spool-*`, `-features-*`: the spooled training images and their features, up to a
few GB). A worker deletes those in which nothing changed for longer than any task may run (the longer of
the two hard time limits), so nothing still in use is touched: when it starts, and every
`TIDY_INTERVAL` seconds after (a pool process killed by the kernel is replaced without a restart).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.logs import log_event
from common.settings import get_settings
from workers.periodic import PeriodicStep

logger = logging.getLogger(__name__)

TIDY_INTERVAL = 3600
SCRATCH_PREFIXES = ("totalrecall-fit-", "totalrecall-spool-", "totalrecall-features-")
_MODEL_FOLDER = re.compile(r"^[0-9a-f]{64}$")
_PARTIAL_MODEL = re.compile(r"^\.[0-9a-f]{64}-")  # a download's temporary folder, or one renamed away


def mark_used(folder: Path) -> None:
    """Record that the model in `folder` was just used (least recently used models are pruned first)."""
    with contextlib.suppress(OSError):
        os.utime(folder)


def discard_model(folder: Path) -> bool:
    """Delete a model folder of the cache (renamed away first); False if it was gone already."""
    return _remove(folder, rename_to=folder.with_name(f".{folder.name}-discarded-{uuid.uuid4().hex[:8]}"))


def prune_model_cache(cache_dir: Path, max_bytes: int, keep: Iterable[str] = ()) -> list[str]:
    """Delete the least recently used model folders until the cache fits `max_bytes`; the sha256 of those
    deleted. The most recently used folder and those named in `keep` stay, even beyond the bound."""
    folders = []
    for entry in _entries(cache_dir):
        if _MODEL_FOLDER.match(entry.name) and entry.is_dir():
            with contextlib.suppress(OSError):
                folders.append((entry.stat().st_mtime, entry.name, _tree_bytes(Path(entry.path))))
    folders.sort()
    keep = {*keep, *(name for _, name, _ in folders[-1:])}
    total = sum(size for _, _, size in folders)
    removed = []
    for _, name, size in folders:
        if total <= max_bytes:
            break
        if name in keep:
            continue
        if discard_model(cache_dir / name):
            removed.append(name)
        total -= size  # gone either way: deleted here, or by another process pruning at the same time
    return removed


def sweep_leftovers(cache_dir: Path, scratch_dir: Path, older_than: float) -> list[Path]:
    """Delete partial model downloads in `cache_dir` and fit scratch folders in `scratch_dir` in which
    nothing changed for `older_than` seconds; the folders deleted."""
    cutoff = time.time() - older_than
    candidates = [Path(e.path) for e in _entries(cache_dir) if _PARTIAL_MODEL.match(e.name)]
    candidates += [Path(e.path) for e in _entries(scratch_dir) if e.name.startswith(SCRATCH_PREFIXES)]
    return [path for path in candidates if _newest_change(path) < cutoff and _remove(path)]


def tidy_worker_disk() -> None:
    """Sweep the leftovers of killed tasks and bring the model cache within its bound (never raises)."""
    settings = get_settings()
    longest_task = max(settings.score_time_limits[1], settings.fit_time_limits[1])
    try:
        swept = sweep_leftovers(settings.cache_dir, Path(tempfile.gettempdir()), longest_task)
        pruned = prune_model_cache(settings.cache_dir, settings.model_disk_cache_mb * 2**20)
    except Exception as exc:  # e.g. a read-only disk: it must not stop the worker
        log_event(logger, logging.WARNING, "worker_disk_not_tidied", error=str(exc))
        return
    if swept or pruned:
        log_event(logger, logging.INFO, "worker_disk_tidied", leftovers=len(swept),
                  models_pruned=len(pruned), examples=",".join(p.name for p in swept[:3]))


class DiskTidyStep(PeriodicStep):
    """Worker bootstep: `tidy_worker_disk` when the worker starts (logging is set up by then), then every
    `TIDY_INTERVAL` seconds."""

    thread_name = "totalrecall-disk"

    def start(self, parent: Any) -> None:
        tidy_worker_disk()
        super().start(parent)

    def interval(self, parent: Any) -> float | None:
        return TIDY_INTERVAL

    def work(self) -> None:
        tidy_worker_disk()


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _newest_change(path: Path) -> float:
    """The latest mtime of `path` and everything under it (a file being written keeps it recent)."""
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            for child in path.rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, child.stat().st_mtime)
        return newest
    except FileNotFoundError:
        return float("inf")  # gone already: nothing to delete


def _remove(path: Path, rename_to: Path | None = None) -> bool:
    """Delete a folder or file (renamed to `rename_to` first, atomically); False if it was gone already
    (another process deleted it) or cannot be deleted (logged)."""
    try:
        if rename_to is not None:
            os.rename(path, rename_to)
            path = rename_to
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log_event(logger, logging.WARNING, "worker_disk_not_tidied", path=str(path), error=str(exc))
        return False
    return True
