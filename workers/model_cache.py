"""Fitted models kept by a worker process: in memory (LRU by size) and on local disk (by sha256).

A model's size is its kNN index's host memory (`NearestNeighbors.nbytes`: the bank, plus an IVF index's
lists); the backbone is shared by every model of the same backbone (`patchcore.shared_backbone`), so
many products on one worker cost one backbone and their banks.

A nightly run scores many chunks of one product in a row; each worker process loads that product's model
once. The disk copy (`<cache_dir>/<sha256>/`) survives restarts and is shared by the processes of one
machine; it is written to a temporary folder and renamed into place, so a half-downloaded artifact is
never read, and kept within `TOTALRECALL_MODEL_DISK_CACHE_MB` (`workers.local_disk`). Every load verifies
the artifact against the sha256 recorded in the database.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from common.engine.artifact import BANK_FILE, META_FILE, ArtifactError, ArtifactIncompatible
from common.engine.patchcore import PatchCore
from common.logs import log_event
from common.per_process import PerProcess
from common.settings import get_settings
from common.storage import open_storage
from workers.local_disk import discard_model, mark_used, prune_model_cache

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0  # model found in memory
    loads: int = 0  # model built from an artifact folder (after a miss)
    downloads: int = 0  # artifact fetched from storage into the disk cache
    evictions: int = 0


class ModelCache:
    """Process-local, thread-safe cache of `PatchCore` models keyed by artifact sha256."""

    def __init__(self, cache_dir: str | Path, max_bytes: int, device: str | None = "auto",
                 disk_max_bytes: int | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.disk_max_bytes = disk_max_bytes  # None: the disk copies are never pruned
        self.device = device
        self.stats = CacheStats()
        self._models: OrderedDict[str, PatchCore] = OrderedDict()
        self._lock = threading.Lock()  # guards _models, stats and _key_locks
        self._key_locks: dict[str, threading.Lock] = {}

    def get(self, sha256: str, artifact_uri: str) -> PatchCore:
        """The model with this artifact hash, loading it (from disk, else from `artifact_uri`) if needed."""
        with self._lock:
            model = self._touch(sha256)
            key_lock = None if model is not None else self._key_locks.setdefault(sha256, threading.Lock())
        if model is not None:
            mark_used(self.cache_dir / sha256)  # its disk copy is in use too: pruned last
            return model
        with key_lock:  # one load per model, while other models stay available
            with self._lock:
                model = self._touch(sha256)
                if model is not None:
                    return model
            started = time.monotonic()
            model, source = self._load(sha256, artifact_uri)
            with self._lock:
                self.stats.loads += 1
                self._models[sha256] = model
                self._evict()
                cached = len(self._models)
            log_event(logger, logging.INFO, "model_loaded", sha256=sha256[:12], source=source,
                      seconds=time.monotonic() - started, bytes=_model_bytes(model), cached=cached)
            return model

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(_model_bytes(m) for m in self._models.values())

    def cached(self) -> list[str]:
        """sha256 of the models in memory, least recently used first."""
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

    def _touch(self, sha256: str) -> PatchCore | None:
        model = self._models.get(sha256)
        if model is not None:
            self._models.move_to_end(sha256)
            self.stats.hits += 1
        return model

    def _evict(self) -> None:
        """Drop least recently used models until within the bound (the newest always stays)."""
        total = sum(_model_bytes(m) for m in self._models.values())
        while total > self.max_bytes and len(self._models) > 1:
            sha256, oldest = self._models.popitem(last=False)
            total -= _model_bytes(oldest)
            self.stats.evictions += 1
            log_event(logger, logging.INFO, "model_evicted", sha256=sha256[:12], bytes=_model_bytes(oldest),
                      max_bytes=self.max_bytes)

    def _load(self, sha256: str, artifact_uri: str) -> tuple[PatchCore, str]:
        """The model and where it came from: "disk" (the local copy) or "storage" (downloaded)."""
        folder = self.cache_dir / sha256
        if folder.is_dir():
            try:
                mark_used(folder)  # first: a process pruning meanwhile deletes other copies first
                return PatchCore.load(folder, sha256, device=self.device), "disk"
            except ArtifactIncompatible:
                raise  # intact: a new download would fail the same way (and the copy serves once fixed)
            except (ArtifactError, OSError) as exc:  # damaged, or deleted meanwhile by another process
                log_event(logger, logging.WARNING, "model_copy_damaged", sha256=sha256[:12], error=str(exc),
                          action="downloading it again")
                discard_model(folder)
        model = self._download(sha256, artifact_uri, folder)
        mark_used(folder)
        if self.disk_max_bytes is not None:
            pruned = prune_model_cache(self.cache_dir, self.disk_max_bytes, keep=[sha256])
            if pruned:
                log_event(logger, logging.INFO, "model_copies_pruned", count=len(pruned),
                          sha256=",".join(p[:12] for p in pruned), max_bytes=self.disk_max_bytes)
        return model, "storage"

    def _download(self, sha256: str, artifact_uri: str, folder: Path) -> PatchCore:
        """Download into a private temporary folder and load the model from there, then put the folder in
        place as the disk copy: another process pruning the cache meanwhile (it removes only model folders
        in place) cannot take the files from under the load."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f".{folder.name}-"))
        try:
            store = open_storage(artifact_uri)
            for name in (BANK_FILE, META_FILE):
                store.get_file(name, tmp / name)
            model = PatchCore.load(tmp, sha256, device=self.device)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process put it there first: theirs is as good as ours
                if not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self.stats.downloads += 1
        return model


def _model_bytes(model: PatchCore) -> int:
    return model.index.nbytes if model.index is not None else 0


_cache: PerProcess[str, ModelCache] = PerProcess()  # one cache per process: a forked child starts empty
_THE_CACHE = "models"


def get_model_cache() -> ModelCache:
    """The process's model cache, bounded and placed by the settings."""

    def make() -> ModelCache:
        settings = get_settings()
        return ModelCache(settings.cache_dir, settings.model_cache_mb * 2**20,
                          disk_max_bytes=settings.model_disk_cache_mb * 2**20)

    return _cache.get(_THE_CACHE, make)


def reset_model_cache() -> None:
    """Forget the process's cache (tests: the next `get_model_cache` follows the current settings)."""
    _cache.pop(_THE_CACHE)
