"""Bounded-memory fit: disk-backed feature store, streamed projection and the coreset on it give the same
memory bank as the in-memory path."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from common.engine import calibration
from common.engine.config import PatchCoreConfig
from common.engine.coreset import (
    StreamingProjection,
    _greedy_pruned,
    _principal_rotation,
    _pruned_loop,
    greedy_coreset,
    greedy_from_projection,
    projection_matrix,
    random_projection,
    row_blocks,
)
from common.engine.featurestore import FeatureStore
from common.engine.patchcore import PatchCore
from common.synthetic import nominal_image


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# --------------------------------------------------------------------------------------- feature store
def test_feature_store_appends_and_gathers_in_any_order(tmp_path) -> None:
    x = _features(1000, 12)
    with FeatureStore(12, tmp_path) as store:
        for s, e in [(0, 1), (1, 300), (300, 301), (301, 1000)]:
            store.append(x[s:e])
        assert len(store) == 1000 and store.nbytes == x.nbytes
        idx = np.array([999, 0, 512, 512, 3, 640, 128, 127], dtype=np.int64)
        np.testing.assert_array_equal(store.gather(idx, block_rows=128), x[idx])  # several blocks
        np.testing.assert_array_equal(store.gather(idx), x[idx])  # one block
        assert store.gather(np.array([], dtype=np.int64)).shape == (0, 12)
        np.testing.assert_array_equal(store.array(), x)
        np.testing.assert_array_equal(store.read_into(np.empty((1000, 12), np.float32)), x)
        with pytest.raises(ValueError):
            store.read_into(np.empty((999, 12), np.float32))
        with pytest.raises(IndexError):
            store.gather(np.array([1000]))
        with pytest.raises(ValueError):
            store.append(np.zeros((2, 11), np.float32))
        path = store.path
        assert path.parent.parent == tmp_path
    assert not path.exists() and not path.parent.exists()  # the temporary folder is gone


# ----------------------------------------------------------------------------------------- projection
def test_row_blocks_never_leave_a_short_last_block() -> None:
    assert row_blocks(10, 4) == [(0, 4), (4, 10)]
    assert row_blocks(8, 4) == [(0, 4), (4, 8)]
    assert row_blocks(3, 4) == [(0, 3)]
    assert row_blocks(0, 4) == [(0, 0)]


@pytest.mark.parametrize("in_dim", [40, 8])  # 8 <= dim: the features are kept as they are
def test_streamed_projection_has_the_same_bits_however_the_rows_come(in_dim: int) -> None:
    x = _features(3000, in_dim, seed=1)
    whole = StreamingProjection(in_dim, 16, seed=3, chunk=256)
    whole.add(x)
    reference = whole.finish()
    rng = np.random.default_rng(0)
    streamed = StreamingProjection(in_dim, 16, seed=3, chunk=256)
    start = 0
    while start < len(x):  # irregular batches, some of one row
        stop = min(len(x), start + int(rng.choice([1, 7, 200, 784])))
        streamed.add(torch.from_numpy(x[start:stop]))
        start = stop
    out = streamed.finish()
    assert out.shape == (3000, min(16, in_dim)) and out.dtype == torch.float32
    assert torch.equal(out, reference)
    matrix = projection_matrix(in_dim, 16, seed=3)
    expected = x if matrix is None else x @ matrix.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not np.shares_memory(out.numpy(), x)  # the caller's rows are never modified later


def test_greedy_from_projection_equals_greedy_coreset() -> None:
    x = _features(5000, 40, seed=2)
    a = greedy_coreset(x, 0.05, projection_dim=16, seed=7)
    b = greedy_from_projection(random_projection(x, 16, 7), 0.05, seed=7)
    assert np.array_equal(a, b)


def test_in_place_rotation_and_thread_count_do_not_change_the_selection() -> None:
    x = _features(20_000, 24, seed=4)
    copy = _greedy_pruned(x, 300, 5, None)
    assert np.array_equal(x, _features(20_000, 24, seed=4))  # not overwritten by default
    inplace = _greedy_pruned(x.copy(), 300, 5, None, overwrite=True)
    assert np.array_equal(copy, inplace)
    y = np.empty_like(x)
    _principal_rotation(x, y)
    head = np.ascontiguousarray(y[:, :16])
    previous = numba.get_num_threads()
    try:
        runs = []
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            runs.append(_pruned_loop(head, y, 300, 5, threads, None))
    finally:
        numba.set_num_threads(previous)
    assert all(np.array_equal(r, copy) for r in runs)


# ------------------------------------------------------------------------------------------------ fit
def test_streamed_fit_gives_the_in_memory_bank(tmp_path) -> None:
    cfg = PatchCoreConfig(image_size=96, coreset_ratio=0.1, batch_size=3)
    images = [lambda i=i: nominal_image(i, 128) for i in range(9)]
    model = PatchCore(cfg, device="cpu")
    stats = model.fit(images, scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the feature file is removed after the fit
    bank_ids, _ = calibration.holdout_split(len(images), cfg.holdout_fraction, cfg.seed)
    feats, failures = model.extract([images[i] for i in bank_ids])
    assert not failures and stats["patch_features"] == len(feats)
    reference = feats[greedy_coreset(feats, cfg.coreset_ratio, cfg.projection_dim, cfg.seed,
                                     minimum=cfg.coreset_min_size)]  # the 1000-feature floor applies
    assert model.index.bank.shape == reference.shape == (stats["bank_size"], model.features.dim)
    assert np.array_equal(model.index.bank, reference)
    assert stats["feature_store_mb"] == pytest.approx(feats.nbytes / 2**20, abs=0.1)


def test_fit_without_any_usable_image_says_so(tmp_path) -> None:
    model = PatchCore(PatchCoreConfig(image_size=64), device="cpu")
    with pytest.raises(ValueError, match="no usable training image"):
        model.fit([b"not an image", b"nor this"], scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
