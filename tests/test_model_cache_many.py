"""A worker's model cache with many products: bounded by memory (LRU), one shared backbone, disk reuse."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from common.engine.artifact import META_FILE, ArtifactIncompatible
from common.engine.config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from workers.model_cache import ModelCache

N_MODELS = 50
BANK_ROWS = 200


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[tuple[str, str]]:
    """(sha256, artifact folder) of 50 small real models (same backbone, different banks)."""
    root = tmp_path_factory.mktemp("store")
    model = PatchCore(PatchCoreConfig(image_size=64), device="cpu")
    out = []
    for i in range(N_MODELS):
        model.set_bank(np.random.default_rng(i).standard_normal((BANK_ROWS, model.features.dim), np.float32))
        model.image_threshold = model.pixel_threshold = float(i)
        folder = root / f"product-{i:02d}"
        out.append((model.save(folder), str(folder)))
    return out


def test_fifty_models_stay_within_the_memory_bound(artifacts, tmp_path: Path) -> None:
    bank_bytes = BANK_ROWS * 152 * 4
    cache = ModelCache(tmp_path / "cache", max_bytes=10 * bank_bytes, device="cpu")
    models = [cache.get(sha, uri) for sha, uri in artifacts]
    assert cache.stats.loads == cache.stats.downloads == N_MODELS
    assert cache.stats.evictions == N_MODELS - 10
    assert cache.bytes_used == 10 * bank_bytes
    assert cache.cached() == [sha for sha, _ in artifacts[-10:]]  # the ten most recently used
    assert len({id(m.features.extractor) for m in models}) == 1  # one backbone for all products
    assert [m.image_threshold for m in models] == list(range(N_MODELS))

    recent, evicted = artifacts[-5], artifacts[0]
    assert cache.get(*recent) is models[-5]  # a memory hit moves it to the end of the LRU order
    assert cache.cached()[-1] == recent[0] and cache.stats.hits == 1
    again = cache.get(*evicted)  # evicted from memory: loaded from the disk copy, not downloaded
    assert again is not models[0] and cache.stats.downloads == N_MODELS and cache.stats.loads == N_MODELS + 1
    assert cache.cached()[-1] == evicted[0] and cache.bytes_used <= 10 * bank_bytes
    assert np.array_equal(again.index.bank, models[0].index.bank)


def test_a_model_larger_than_the_bound_is_kept_alone(artifacts, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache", max_bytes=1, device="cpu")
    for sha, uri in artifacts[:3]:
        cache.get(sha, uri)
        assert cache.cached() == [sha]  # the newest model always stays, the others go
    assert cache.stats.evictions == 2


def _copies(cache: ModelCache) -> list[str]:
    return sorted(p.name for p in cache.cache_dir.iterdir())


def test_disk_copies_stay_within_their_bound_least_recently_used_first(artifacts, tmp_path: Path) -> None:
    one = sum(f.stat().st_size for f in Path(artifacts[0][1]).iterdir())
    cache = ModelCache(tmp_path / "cache", max_bytes=1, device="cpu", disk_max_bytes=int(2.5 * one))
    (a, a_uri), (b, b_uri), (c, c_uri) = artifacts[:3]

    def get(sha: str, uri: str) -> None:
        time.sleep(0.05)  # file times tick in steps of a few ms: one step between uses
        cache.get(sha, uri)

    get(a, a_uri)
    get(b, b_uri)
    assert _copies(cache) == sorted([a, b])
    get(a, a_uri)  # a from its disk copy (b evicted it from memory): used after b now
    assert cache.stats.downloads == 2
    get(c, c_uri)  # the third copy is past the bound: b, the least recently used, goes
    assert _copies(cache) == sorted([a, c])
    get(b, b_uri)
    assert cache.stats.downloads == 4 and _copies(cache) == sorted([b, c])

    alone = ModelCache(tmp_path / "small", max_bytes=1, device="cpu", disk_max_bytes=1)
    alone.get(a, a_uri)  # a model larger than the bound keeps its own copy
    alone.get(b, b_uri)
    assert _copies(alone) == [b]



def test_a_download_survives_another_process_pruning_the_cache_meanwhile(artifacts, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker process on the machine finishes downloading model Y just as this one puts model X in
    place, and prunes the disk cache keeping Y: X's folder goes. The load used to read X from that folder
    afterwards (ArtifactError: the job failed as "model cannot be used"); it reads the private copy first."""
    import os

    import workers.model_cache as model_cache
    from workers.local_disk import prune_model_cache

    (x_sha, x_uri), (y_sha, y_uri) = artifacts[0], artifacts[1]
    cache = ModelCache(tmp_path / "cache", max_bytes=2**30, device="cpu")
    cache.get(y_sha, y_uri)
    class PrunedAfterRename:  # the model cache's `os`, whose rename is followed by the other process's prune
        def __getattr__(self, name: str):
            return getattr(os, name)

        @staticmethod
        def rename(src, dst) -> None:
            os.rename(src, dst)
            later = time.time() + 5
            os.utime(tmp_path / "cache" / y_sha, (later, later))  # Y's download just finished over there
            assert x_sha in prune_model_cache(tmp_path / "cache", 1, keep=[y_sha])

    monkeypatch.setattr(model_cache, "os", PrunedAfterRename())
    model = cache.get(x_sha, x_uri)
    assert model.image_threshold == 0.0 and not (tmp_path / "cache" / x_sha).exists()


def test_an_intact_but_incompatible_copy_is_kept_and_not_downloaded_again(artifacts, tmp_path: Path) -> None:
    """A copy this code cannot use (here: a future artifact format) is not damaged: it is neither deleted
    nor downloaded again on every chunk (which would fail the same way), and the reason is raised."""
    sha, uri = artifacts[0]
    future = json.loads((Path(uri) / META_FILE).read_bytes()) | {"format_version": 99}
    data = json.dumps(future).encode()
    future_sha = hashlib.sha256(data).hexdigest()
    copy = tmp_path / "cache" / future_sha
    shutil.copytree(uri, copy)
    (copy / META_FILE).write_bytes(data)
    cache = ModelCache(tmp_path / "cache", max_bytes=2**30, device="cpu")
    for _ in range(2):
        with pytest.raises(ArtifactIncompatible, match="unsupported artifact format"):
            cache.get(future_sha, uri)
    assert cache.stats.downloads == 0 and (copy / META_FILE).read_bytes() == data
