"""Engine building blocks checked against hand computations and brute force: Eq. 7, coreset, kNN,
anomaly-map smoothing and preprocessing geometry."""

from __future__ import annotations

import math
import resource
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from scipy.spatial.distance import cdist

from common.engine.config import PatchCoreConfig
from common.engine.coreset import (
    _greedy_dense,
    _greedy_pruned,
    coreset_size,
    greedy_coreset,
)
from common.engine.knn import NearestNeighbors
from common.engine.loader import Batch, iter_batches
from common.engine.preprocessing import GRID, resized_hw, resolve_resize, to_input
from common.engine.scoring import image_scores, reweighted_image_score, smooth_maps

# ------------------------------------------------------------------------------------------- Eq. 7
BANK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=np.float32)


def test_eq7_by_hand() -> None:
    t = np.array([-1.0, 0.0], dtype=np.float32)
    # nearest bank point m* = (0, 0) at distance 1; its b=3 nearest bank points are itself, (1, 0)
    # and (0, 1); their distances to t are 1, 2 and sqrt(2)
    expected_w = 1.0 - math.exp(1.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(math.sqrt(2.0)))
    s_star = 1.0
    got = reweighted_image_score(t, 0, np.array([0, 1, 2]), BANK, s_star)
    assert got == pytest.approx(expected_w * s_star, rel=1e-6)

    # the same through the batch path with a real index: one image with two patches, t the worst one
    index = NearestNeighbors(BANK, use_gpu=False)
    feats = np.stack([np.array([0.9, 0.1], np.float32), t])[None]  # (1, 2, 2)
    dist, ids = index.search(feats[0], 1)
    dist, ids = dist.reshape(1, 2), ids.reshape(1, 2)
    assert ids[0, 1] == 0 and dist[0, 1] == pytest.approx(1.0)
    scores = image_scores(feats, dist, ids, index, num_neighbors=3)
    assert scores.shape == (1,)
    assert scores[0] == pytest.approx(expected_w * 1.0, rel=1e-5)

    # b = 0: the reweighting is off, the image score is the largest patch distance
    raw = image_scores(feats, dist, ids, index, num_neighbors=0)
    assert raw[0] == pytest.approx(1.0)
    assert reweighted_image_score(t, 0, np.array([], dtype=np.int64), BANK, 1.0) == 1.0


def test_image_score_top_fraction_by_hand() -> None:
    """s* = the mean of the highest fraction of the patch distances (at least one patch; of the counted
    patches), and Eq. 7 weighs it with the worst patch's neighbourhood."""
    index = NearestNeighbors(BANK, use_gpu=False)
    t = np.array([-1.0, 0.0], dtype=np.float32)  # nearest bank point (0, 0) at distance 1
    feats = np.stack([t + np.float32(0.5), t * 0, t * 0, t])[None]  # (1, 4, 2): t is the worst patch
    dist, ids = index.search(feats[0], 1)
    dist, ids = dist.reshape(1, 4), ids.reshape(1, 4)
    assert dist[0].argmax() == 3
    d = np.sort(dist[0])
    assert image_scores(feats, dist, ids, index, 0, top_fraction=0.5)[0] == pytest.approx((d[2] + d[3]) / 2)
    assert image_scores(feats, dist, ids, index, 0, top_fraction=1.0)[0] == pytest.approx(d.mean())
    assert image_scores(feats, dist, ids, index, 0, top_fraction=0.01)[0] == pytest.approx(d[3])  # one patch
    # two counted patches (a region of interest): half of them is one patch, the highest
    assert image_scores(feats, dist, ids, index, 0, top_fraction=0.5, counted=2)[0] == pytest.approx(d[3])
    _, neighbors = index.search(BANK[[0]], 3)
    expected = reweighted_image_score(t, 0, neighbors[0], BANK, float((d[2] + d[3]) / 2))
    assert image_scores(feats, dist, ids, index, 3, top_fraction=0.5)[0] == pytest.approx(expected, rel=1e-6)
    assert image_scores(feats, dist, ids, index, 3)[0] == pytest.approx(
        reweighted_image_score(t, 0, neighbors[0], BANK, float(d[3])), rel=1e-6)
    with pytest.raises(ValueError, match="image_score_top"):
        PatchCoreConfig(image_score_top=1.5)


def test_eq7_b_larger_than_bank_uses_whole_bank() -> None:
    t = np.array([-1.0, 0.0], dtype=np.float32)
    index = NearestNeighbors(BANK, use_gpu=False)
    dist, ids = index.search(t[None], 1)
    d = [1.0, 2.0, math.sqrt(2.0), math.sqrt(36.0 + 25.0)]
    expected = 1.0 - math.exp(d[0]) / sum(math.exp(v) for v in d)
    got = image_scores(t[None, None], dist.reshape(1, 1), ids.reshape(1, 1), index, num_neighbors=9)
    assert got[0] == pytest.approx(expected, rel=1e-5)


def test_eq7_with_a_bank_of_one_row_keeps_the_distance() -> None:
    """m* alone as its own neighbourhood would weigh every image score to 0 (or a rounding error below
    it), so that nothing is ever flagged: with fewer than two neighbours the score is s* itself."""
    index = NearestNeighbors(np.array([[3.0, 4.0]], np.float32), use_gpu=False)
    t = np.array([[0.0, 0.0]], np.float32)
    dist, ids = index.search(t, 1)
    got = image_scores(t[None], dist.reshape(1, 1), ids.reshape(1, 1), index, num_neighbors=9)
    assert got[0] == pytest.approx(5.0)


def test_eq7_direction_sparse_neighbourhood_keeps_more_of_the_score() -> None:
    """What Eq. 7 does: w = 1 - exp(d*) / sum_j exp(d_j) over the b bank neighbours of m* (m* included).
    Since m* is the test patch's nearest bank point, every d_j >= d*, so 1 - 1/b <= w < 1:
    - m* in a dense cluster (neighbours about as far from the test patch as m*): w ~ 1 - 1/b;
    - m* isolated (neighbours much farther from the test patch): w ~ 1.
    So a test patch whose nearest bank point is a rare (sparse) nominal feature scores higher."""
    b = 4
    t = np.array([-1.0, 0.0], dtype=np.float32)
    eps = 0.01
    dense = np.array([[0, 0], [eps, 0], [0, eps], [eps, eps], [20, 20]], dtype=np.float32)
    sparse = np.array([[0, 0], [3, 0], [0, 3], [0, -3], [20, 20]], dtype=np.float32)
    scores = {}
    for name, bank in (("dense", dense), ("sparse", sparse)):
        index = NearestNeighbors(bank, use_gpu=False)
        dist, ids = index.search(t[None], 1)
        assert ids[0, 0] == 0 and dist[0, 0] == pytest.approx(1.0)
        scores[name] = image_scores(t[None, None], dist.reshape(1, 1), ids.reshape(1, 1), index, b)[0]
    assert scores["dense"] == pytest.approx(1.0 - 1.0 / b, abs=0.01)
    # sparse: neighbours at distance 4, sqrt(10), sqrt(10) from t
    e = math.exp
    assert scores["sparse"] == pytest.approx(1 - e(1) / (e(1) + e(4) + 2 * e(math.sqrt(10))), rel=1e-5)
    assert scores["sparse"] > 0.97
    assert scores["sparse"] > scores["dense"]


def test_eq7_weight_bounds_on_random_data() -> None:
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((200, 8)).astype(np.float32)
    tests = rng.standard_normal((50, 8)).astype(np.float32) * 1.5
    index = NearestNeighbors(bank, use_gpu=False)
    b = 5
    for t in tests:
        dist, ids = index.search(t[None], 1)
        s = image_scores(t[None, None], dist.reshape(1, 1), ids.reshape(1, 1), index, b)[0]
        w = s / dist[0, 0]
        assert 1.0 - 1.0 / b - 1e-5 <= w < 1.0


def test_config_rejects_b_equal_one() -> None:
    with pytest.raises(ValueError):
        PatchCoreConfig(num_neighbors=1)


@pytest.mark.parametrize(("setting", "message"), [
    ({"seed": -1}, "seed must be an integer >= 0"),  # every fit failed in the random generator
    ({"seed": 1.5}, "seed must be an integer >= 0"),
    ({"sigma": float("nan")}, "sigma must be a number >= 0"),  # every map failed in the Gaussian kernel
    ({"sigma": float("inf")}, "sigma must be a number >= 0"),
    ({"sigma": -1.0}, "sigma must be a number >= 0"),
    ({"num_neighbors": 2.5}, "num_neighbors .* must be an integer"),  # every score failed in the kNN search
    ({"resize": "square", "center_crop": 0}, "center_crop in 1..image_size"),
    # through the API (the CLI types them): a fractional or textual size failed later, or never did
    ({"image_size": 288.5}, "image_size must be an integer"),
    ({"image_size": "288"}, "image_size must be an integer"),
    ({"resize": "square", "center_crop": 224.5}, "center_crop must be an integer"),
    ({"embed_dim": True}, "embed_dim must be an integer"),
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"coreset_ratio": "0.1"}, "coreset_ratio must be a finite number"),
])
def test_config_refuses_settings_every_fit_would_fail_on(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PatchCoreConfig(**setting)
    assert PatchCoreConfig(seed=np.int64(3), sigma=np.float32(2.0), num_neighbors=np.int64(4)).seed == 3
    # a whole number written as a float (stored so by older versions, in settings and artifacts) still loads
    whole = PatchCoreConfig.from_dict({"image_size": 96.0, "embed_dim": 256.0, "center_crop": None})
    assert (whole.image_size, whole.embed_dim) == (96, 256) and isinstance(whole.image_size, int)


# ------------------------------------------------------------------------------------------ coreset
def _farthest_first_reference(x: np.ndarray, k: int, start: int) -> np.ndarray:
    """Textbook greedy k-center in float64 (the paper's Algorithm 1 without projection)."""
    x = x.astype(np.float64)
    selected = [start]
    mind = np.linalg.norm(x - x[start], axis=1)
    for _ in range(1, k):
        nxt = int(np.argmax(mind))
        selected.append(nxt)
        mind = np.minimum(mind, np.linalg.norm(x - x[nxt], axis=1))
    return np.array(selected)


def _clustered(n: int, clusters: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, size=(clusters, d))
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + 0.1 * rng.standard_normal((n, d))).astype(np.float32)


def _radius(x: np.ndarray, selected: np.ndarray) -> float:
    return float(cdist(x, x[selected]).min(axis=1).max())


def test_coreset_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
    a = greedy_coreset(x, 0.05, projection_dim=16, seed=0)
    b = greedy_coreset(x, 0.05, projection_dim=16, seed=0)
    c = greedy_coreset(x, 0.05, projection_dim=16, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == len(a) == 150


@pytest.mark.parametrize(("n", "ratio"), [(1000, 0.1), (999, 0.1), (1234, 0.25), (50, 1.0), (10, 0.001)])
def test_coreset_size(n: int, ratio: float) -> None:
    x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
    selected = greedy_coreset(x, ratio, projection_dim=128, seed=0)
    expected = max(1, round(n * ratio))
    assert coreset_size(n, ratio) == expected
    assert len(selected) == expected
    assert len(np.unique(selected)) == expected
    assert selected.min() >= 0 and selected.max() < n


def test_a_coreset_of_everything_selects_nothing() -> None:
    x = np.random.default_rng(4).standard_normal((5000, 8)).astype(np.float32)
    assert np.array_equal(greedy_coreset(x, 1.0, seed=3), np.arange(5000))  # not a farthest-first permutation
    assert np.array_equal(greedy_coreset(x[:200], 0.01, seed=3, minimum=300), np.arange(200))


def test_coreset_minimum_size_keeps_small_sets_covered() -> None:
    x = np.random.default_rng(3).standard_normal((2000, 8)).astype(np.float32)
    assert coreset_size(2000, 0.01, minimum=300) == 300  # 1 % would be 20
    assert coreset_size(200_000, 0.01, minimum=300) == 2000  # the ratio wins on large sets
    assert coreset_size(100, 0.01, minimum=300) == 100  # never more than all features
    small = greedy_coreset(x, 0.01, seed=0, minimum=300)
    assert len(small) == 300 and np.array_equal(small[:20], greedy_coreset(x, 0.01, seed=0))  # same order
    with pytest.raises(ValueError):
        PatchCoreConfig(coreset_min_size=-1)


def test_greedy_coreset_covers_better_than_random() -> None:
    x = _clustered(2000, 20, 8, seed=5)
    selected = greedy_coreset(x, 0.01, projection_dim=128, seed=0)  # 8-d: no projection
    assert len(selected) == 20
    greedy_r = _radius(x, selected)
    rng = np.random.default_rng(0)
    for _ in range(5):
        random_r = _radius(x, rng.choice(len(x), len(selected), replace=False))
        assert greedy_r < random_r
    # greedy k-center is a 2-approximation: with 20 tight clusters the optimum is about a cluster's
    # radius, far below the distance between clusters
    assert greedy_r < 2.0


def test_greedy_matches_textbook_farthest_first() -> None:
    x = np.random.default_rng(11).standard_normal((2000, 12)).astype(np.float32)
    selected = greedy_coreset(x, 0.1, projection_dim=128, seed=4)  # 12-d: no projection
    reference = _farthest_first_reference(x, len(selected), int(selected[0]))
    assert np.array_equal(selected[:150], reference[:150])


def test_coreset_stops_when_every_feature_is_covered() -> None:
    """Five distinct features repeated 100 times, 50 asked for: once all five are picked every distance
    is 0, and the loop used to pick index 0 again and again (45 repeated bank rows)."""
    x = np.repeat(np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32), 100, axis=0)
    for pick in (lambda: _greedy_pruned(x.copy(), 50, 7, None),
                 lambda: _greedy_dense(torch.from_numpy(x.copy()), 50, 7, None).numpy(),
                 lambda: greedy_coreset(x, 0.1, projection_dim=128, seed=0, minimum=0)):
        selected = pick()
        assert len(selected) == 5 and len({tuple(r) for r in x[selected]}) == 5
    near = x + np.random.default_rng(4).normal(0, 0.02, x.shape).astype(np.float32)  # distinct, if close
    assert len(_greedy_pruned(near.copy(), 50, 7, None)) == len(_greedy_dense(torch.from_numpy(near), 50, 7, None)) == 50


def test_pruned_and_dense_select_the_same_sequence() -> None:
    x = np.random.default_rng(2).standard_normal((6000, 16)).astype(np.float32)
    k, start = 300, 17
    pruned = _greedy_pruned(x, k, start, None)
    dense = _greedy_dense(torch.from_numpy(x), k, start, None).numpy()
    assert len(pruned) == len(dense) == k
    assert pruned[0] == dense[0] == start
    assert np.array_equal(pruned[:200], dense[:200])


def _assert_farthest_first(x: np.ndarray, selected: np.ndarray, rel_tol: float) -> None:
    """Every selection is (up to float32 rounding) the point farthest from those selected before it."""
    x64 = x.astype(np.float64)
    mind = np.linalg.norm(x64 - x64[selected[0]], axis=1)
    for i in range(1, len(selected)):
        assert mind[selected[i]] >= mind.max() * (1.0 - rel_tol), f"step {i}: not the farthest point"
        mind = np.minimum(mind, np.linalg.norm(x64 - x64[selected[i]], axis=1))


def test_pruned_and_dense_are_farthest_first_on_clustered_data() -> None:
    # clusters far from the origin: the pruning skips most clusters at each step, and float32
    # |x|^2 - 2 x.c + |c|^2 distances create near-ties, so the two loops may part ways late;
    # each must still pick a farthest point at every step
    x = _clustered(6000, 30, 16, seed=8)
    pruned = _greedy_pruned(x, 200, 0, None)
    dense = _greedy_dense(torch.from_numpy(x), 200, 0, None).numpy()
    assert np.array_equal(pruned[:30], dense[:30])  # one centre per cluster first: no near-ties there
    _assert_farthest_first(x, pruned, rel_tol=1e-3)
    _assert_farthest_first(x, dense, rel_tol=1e-3)
    assert len(np.unique(pruned)) == 200


def test_coreset_memory_is_bounded() -> None:
    n, d = 200_000, 16
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the process's peak so far
    tracemalloc.start()
    try:
        selected = greedy_coreset(x, 0.001, projection_dim=128, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(selected) == 200
    # N x N float32 would be 160 GB, even N x k float32 160 MB; O(N * d) is a few tens of MB
    assert peak < 100 * 2**20, peak
    assert peak < n * n * 4 / 1000
    # torch allocations are not traced: the process peak must not grow by much either
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 300


# ---------------------------------------------------------------------------------------------- kNN
def test_knn_returns_true_l2_distances() -> None:
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((500, 32)).astype(np.float32)
    queries = rng.standard_normal((300, 32)).astype(np.float32)
    index = NearestNeighbors(bank, use_gpu=False, batch=64)  # several batches
    assert len(index) == 500
    dist, ids = index.search(queries, k=5)
    brute = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(brute, axis=1)[:, :5]
    assert np.array_equal(ids, order)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, order, axis=1), rtol=1e-4, atol=1e-4)


def test_knn_distances_near_a_bank_row_are_exact_in_any_batch() -> None:
    """faiss's fast path (|q|^2 + |b|^2 - 2 q.b in float32) got distances of about 0.1 for queries at a
    bank row with norms like real features', depending on the batch: enough to flip the verdict of a
    near-duplicate image. The distances are computed again from the differences."""
    rng = np.random.default_rng(2)
    bank = (rng.standard_normal((1000, 152)) * 10).astype(np.float32)  # squared norms about 1.5e4
    queries = bank + rng.standard_normal((1000, 152)).astype(np.float32) * 1e-3
    truth = np.linalg.norm(queries.astype(np.float64) - bank.astype(np.float64), axis=1)
    for batch in (1000, 7):
        dist, ids = NearestNeighbors(bank, use_gpu=False, batch=batch).search(queries, k=3)
        assert np.array_equal(ids[:, 0], np.arange(1000))
        np.testing.assert_allclose(dist[:, 0], truth, rtol=1e-4, atol=1e-6)
        assert (np.diff(dist, axis=1) >= 0).all()
    assert NearestNeighbors(bank, use_gpu=False).search(bank, k=1)[0].max() == 0.0


def test_knn_distance_is_not_squared() -> None:
    index = NearestNeighbors(np.zeros((1, 2), np.float32), use_gpu=False)
    dist, ids = index.search(np.array([[3.0, 4.0]], np.float32), 1)
    assert dist[0, 0] == pytest.approx(5.0)
    assert ids[0, 0] == 0


# ---------------------------------------------------------------------------------------- smoothing
def test_smooth_single_peak_stays_in_place_and_conserves_mass() -> None:
    patch = torch.zeros(1, 8, 8)
    patch[0, 3, 5] = 1.0
    out = smooth_maps(patch, (64, 64), sigma=4.0)[0].numpy()
    assert out.shape == (64, 64)
    # patch (3, 5) covers input pixels 24..31 x 40..47; its centre is at 27.5, 43.5
    y, x = np.unravel_index(np.argmax(out), out.shape)
    assert y in (27, 28) and x in (43, 44)
    # bilinear upsampling by 8 spreads the unit peak over a tent of total mass 8 x 8; the blur keeps it
    assert out.sum() == pytest.approx(64.0, rel=1e-4)
    assert out.max() < 1.0  # it was smoothed
    # symmetric around the peak centre
    np.testing.assert_allclose(out[27 - 10: 28 + 11, 43], out[27 - 10: 28 + 11, 43][::-1], atol=1e-6)


def test_smooth_interior_equals_scipy_gaussian() -> None:
    rng = np.random.default_rng(0)
    patch = torch.from_numpy(rng.random((2, 12, 10)).astype(np.float32))
    sigma = 4.0
    out = smooth_maps(patch, (96, 80), sigma).numpy()
    up = torch.nn.functional.interpolate(patch[:, None], size=(96, 80), mode="bilinear",
                                         align_corners=False)[:, 0].numpy().astype(np.float64)
    r = int(4 * sigma + 0.5)
    for i in range(2):
        ref = ndi.gaussian_filter(up[i], sigma)
        # away from the borders the padding mode does not matter
        np.testing.assert_allclose(out[i, r:-r, r:-r], ref[r:-r, r:-r], rtol=1e-5, atol=1e-6)


def test_smooth_sigma_zero_is_plain_bilinear_upsampling() -> None:
    a, b = 1.0, 3.0
    patch = torch.tensor([[[a, b], [a, b]]])  # (1, 2, 2): a column ramp
    out = smooth_maps(patch, (4, 4), sigma=0.0)[0].numpy()
    # align_corners=False, scale 2: output columns sample source x = -0.25 (clamped), 0.25, 0.75, 1.25
    expected_row = [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    for row in out:
        np.testing.assert_allclose(row, expected_row, rtol=1e-6)


def test_smooth_tiny_map_does_not_fail() -> None:
    out = smooth_maps(torch.ones(1, 2, 2), (16, 16), sigma=4.0)  # side 16 <= kernel radius 16
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out.numpy(), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------ preprocessing
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w"), [(300, 500), (500, 300), (96, 96), (37, 1000), (1000, 37), (17, 17)])
def test_keep_aspect_keeps_field_of_view_and_aspect(h: int, w: int) -> None:
    cfg = PatchCoreConfig(image_size=96)
    x, geo = to_input(_image(h, w), cfg, MEAN, STD)
    assert geo.box == (0, 0, h, w)  # the whole image is seen
    assert geo.orig_hw == (h, w)
    rh, rw = x.shape[1:]
    assert (rh, rw) == geo.input_hw
    assert rh % GRID == 0 and rw % GRID == 0 and rh >= GRID and rw >= GRID
    s = 96 / math.sqrt(h * w)  # input area image_size**2
    # each side is the exactly-scaled side rounded to a multiple of 16 (or the 16 minimum)
    assert abs(rh - max(GRID, h * s)) <= GRID / 2
    assert abs(rw - max(GRID, w * s)) <= GRID / 2


def test_keep_aspect_example_by_hand() -> None:
    # 300 x 500 at image_size 96: scale 96 / sqrt(150000) = 0.2479 -> 74.4 x 123.9 -> 80 x 128
    x, _ = to_input(_image(300, 500), PatchCoreConfig(image_size=96), MEAN, STD)
    assert tuple(x.shape) == (3, 80, 128)


def test_square_resize() -> None:
    cfg = PatchCoreConfig(image_size=96, resize="square")
    x, geo = to_input(_image(300, 500), cfg, MEAN, STD)
    assert tuple(x.shape) == (3, 96, 96)
    assert geo.box == (0, 0, 300, 500)


def test_center_crop_box_is_in_the_middle() -> None:
    h, w = 300, 500
    image = _image(h, w)
    cfg = PatchCoreConfig(image_size=96, resize="square", center_crop=64)
    x, geo = to_input(image, cfg, MEAN, STD)
    assert tuple(x.shape) == (3, 64, 64)
    top, left, bh, bw = geo.box
    # the crop is 64/96 of each side, centred
    assert bh == pytest.approx(h * 64 / 96, abs=1) and bw == pytest.approx(w * 64 / 96, abs=1)
    assert top + bh / 2 == pytest.approx(h / 2, abs=1)
    assert left + bw / 2 == pytest.approx(w / 2, abs=1)
    # and the tensor is the middle of the uncropped square input
    full, _ = to_input(image, PatchCoreConfig(image_size=96, resize="square"), MEAN, STD)
    assert torch.equal(x, full[:, 16:80, 16:80])


@pytest.mark.parametrize("hw", [(8, 64), (1, 1), (3, 500)])
def test_center_crop_box_of_a_thin_image_keeps_at_least_a_pixel(hw: tuple[int, int]) -> None:
    cfg = PatchCoreConfig(image_size=512, resize="square", center_crop=32)  # the crop is 1/16 of a side
    _, geo = to_input(_image(*hw), cfg, MEAN, STD)
    top, left, bh, bw = geo.box
    assert bh >= 1 and bw >= 1 and top >= 0 and top + bh <= hw[0] and left >= 0 and left + bw <= hw[1]
    assert bh == max(1, round(hw[0] / 16)) and bw == max(1, round(hw[1] / 16))


def test_normalisation_and_input_checks() -> None:
    white = np.full((40, 60, 3), 255, np.uint8)
    x, _ = to_input(white, PatchCoreConfig(image_size=64), MEAN, STD)
    np.testing.assert_allclose(x.numpy(), 1.0, atol=1e-5)  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError):
        to_input(np.zeros((40, 60), np.uint8), PatchCoreConfig(image_size=64), MEAN, STD)
    with pytest.raises(ValueError):
        to_input(np.zeros((40, 60, 3), np.float32), PatchCoreConfig(image_size=64), MEAN, STD)


@pytest.mark.parametrize(("h", "w"), [(300, 500), (40, 30)])  # downscaled, upscaled
def test_uint8_resize_matches_the_float_antialiased_resize(h: int, w: int) -> None:
    # a smooth image with an edge, so a transposed or shifted resize would differ by far more than a level
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(yy * 255 // h), (xx * 255 // w), 255 * (xx > w // 3)], -1).astype(np.uint8)
    cfg = PatchCoreConfig(image_size=96)
    x, geo = to_input(image, cfg, MEAN, STD)
    ref = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
                                          size=geo.input_hw, mode="bilinear", antialias=True)[0]
    got = x * 0.5 + 0.5  # undo the (0.5, 0.5) normalisation
    assert float((got - ref).abs().max()) <= 1.5 / 255


def test_scale_resize_keeps_pixel_size_constant() -> None:
    cfg = PatchCoreConfig(resize="scale", scale=0.5)
    # every image shrinks by the same factor (to multiples of 16), so textures keep one scale
    for h, w in [(300, 500), (120, 640), (403, 222)]:
        rh, rw = resized_hw(h, w, cfg)
        assert rh % GRID == 0 and rw % GRID == 0
        assert abs(rh - h * 0.5) <= GRID / 2 and abs(rw - w * 0.5) <= GRID / 2
    with pytest.raises(ValueError):
        PatchCoreConfig(resize="scale", scale=0.0)


def test_scale_inputs_far_larger_than_image_size_fail_alone_and_batch_smaller() -> None:
    """Under resize="scale" an image larger than the training images gets a larger input: a batch holds
    at most batch_size x image_size**2 input pixels, and an input above 16 x image_size**2 fails its image
    with the reason (a full frame sent to a tile product used to take gigabytes)."""
    cfg = PatchCoreConfig(image_size=32, resize="scale", scale=1.0, batch_size=4)
    rng = np.random.default_rng(0)
    images = ([rng.integers(0, 256, (32, 32, 3), np.uint8)] * 5 + [rng.integers(0, 256, (64, 64, 3), np.uint8)] * 3
              + [rng.integers(0, 256, (160, 144, 3), np.uint8)])  # input areas: 1, 4 and 22.5 x 32**2
    items = list(iter_batches(images, cfg, (0.5,) * 3, (0.25,) * 3, cfg.batch_size, threads=1))
    batches = [(len(i.positions), tuple(i.tensor.shape[-2:])) for i in items if isinstance(i, Batch)]
    assert batches == [(4, (32, 32)), (1, (32, 32)), (1, (64, 64)), (1, (64, 64)), (1, (64, 64))]
    (failed,) = [i for i in items if not isinstance(i, Batch)]
    assert failed.position == 8 and "its model input would be 144x160, above the limit of 16,384" in failed.error
    assert to_input(images[5], replace(cfg, image_size=64), (0.5,) * 3, (0.25,) * 3)[0].shape == (3, 64, 64)
    # keep_aspect rounds sides to multiples of 16 (900 x 1200 at 288: 256 x 336, a little over 288**2):
    # its batches stay full
    photos = [rng.integers(0, 256, (900, 1200, 3), np.uint8)] * 5
    keep = PatchCoreConfig(image_size=288, resize="keep_aspect", batch_size=4)
    assert [len(b.positions) for b in iter_batches(photos, keep, (0.5,) * 3, (0.25,) * 3, 4, threads=1)] == [4, 1]


def test_auto_resize_keeps_aspect_for_one_size_and_scales_varying_sizes() -> None:
    cfg = PatchCoreConfig(image_size=96)
    assert cfg.resize == "auto"
    assert resolve_resize(cfg, [(300, 500)] * 3).resize == "keep_aspect"
    tiles = resolve_resize(cfg, [(300, 500), (120, 640), (403, 222)])
    # one factor for all: the largest training tile (300 x 500) gets an area of 96**2
    assert tiles.resize == "scale" and tiles.scale == pytest.approx(96 / math.sqrt(300 * 500), abs=1e-4)
    rh, rw = resized_hw(300, 500, tiles)
    assert abs(rh * rw - 96 * 96) <= 0.2 * 96 * 96
    explicit = PatchCoreConfig(image_size=96, resize="square")
    assert resolve_resize(explicit, [(1, 2), (3, 4)]) is explicit  # only "auto" is resolved
    assert resolve_resize(cfg, []).resize == "keep_aspect"  # nothing readable: fit() says why
    # a bank built without fit() (extract + set_bank) keeps "auto" unresolved: it means keep_aspect
    assert resized_hw(300, 500, cfg) == resized_hw(300, 500, replace(cfg, resize="keep_aspect"))


def test_a_large_image_whose_pixels_do_not_decode_does_not_set_the_input_scale() -> None:
    """A truncated upload of a 4000 x 3000 photo among small tiles: its header reads, its pixels do not.
    The scale comes from the largest image that decodes; the broken one fails alone, when the fit decodes it."""
    import io

    from PIL import Image

    from common.engine.loader import source_sizes

    def png(h: int, w: int, seed: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(out, "PNG")
        return out.getvalue()

    tiles = [png(120, 200, 1), png(90, 160, 2), png(100, 100, 3)]
    truncated = png(3000, 4000, 4)[:5000]
    sizes = source_sizes([*tiles, truncated])
    assert sorted(sizes) == [(90, 160), (100, 100), (120, 200)]
    cfg = resolve_resize(PatchCoreConfig(image_size=96), sizes)
    assert cfg.scale == pytest.approx(96 / math.sqrt(120 * 200), abs=1e-4)
    assert sorted(source_sizes([*tiles, png(300, 400, 5)]))[-1] == (300, 400)  # a larger one that decodes counts


def test_decoded_size_reads_headers_with_exif_and_side_limit(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path) -> None:
    import io

    from PIL import Image

    from common.images import ImageDecodeError, decode_image, decoded_size
    from common.settings import reset_settings_cache

    def encoded(w: int, h: int, orientation: int | None = None) -> bytes:
        buf = io.BytesIO()
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="JPEG", exif=exif)
        return buf.getvalue()

    for data in (encoded(40, 30), encoded(40, 30, orientation=6)):
        assert decoded_size(data) == decode_image(data).shape[:2]
    assert decoded_size(encoded(40, 30, orientation=6)) == (40, 30)  # turned a quarter
    assert decoded_size(b"not an image") is None and decoded_size(b"") is None
    (tmp_path / "turned.jpg").write_bytes(encoded(40, 30, orientation=6))
    assert decoded_size(tmp_path / "turned.jpg") == decoded_size(str(tmp_path / "turned.jpg")) == (40, 30)
    assert decoded_size(tmp_path / "missing.png") is None
    # a PNG's eXIf chunk may follow the image data: found by skipping chunks, never by decoding pixels,
    # so a PNG whose pixel data is corrupt still has its size (decoding it then says what is wrong)
    turned_png = _png_with_exif_after_data(40, 30, orientation=6)
    assert decoded_size(turned_png) == (40, 30) == decode_image(turned_png).shape[:2]
    assert decoded_size(_png_with_exif_after_data(40, 30, orientation=6, corrupt_pixels=True)) == (40, 30)
    with pytest.raises(ImageDecodeError):
        decode_image(_png_with_exif_after_data(40, 30, orientation=6, corrupt_pixels=True))
    assert decoded_size(_png_with_exif_after_data(40, 30, orientation=None)) == (30, 40)
    monkeypatch.setenv("TOTALRECALL_MAX_IMAGE_SIDE", "20")
    reset_settings_cache()
    try:
        big_png = Image.new("RGB", (40, 30)), io.BytesIO()
        big_png[0].save(big_png[1], format="PNG")
        assert decoded_size(big_png[1].getvalue()) == (15, 20) == decode_image(big_png[1].getvalue()).shape[:2]
        h, w = decode_image(encoded(40, 30)).shape[:2]  # a JPEG may decode smaller (draft mode)
        assert decoded_size(encoded(40, 30)) == (15, 20) and h <= 15 and w <= 20
    finally:
        monkeypatch.delenv("TOTALRECALL_MAX_IMAGE_SIDE")
        reset_settings_cache()


def test_plain_pngs_decode_through_libpng_to_pillows_values(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import imagecodecs
    from PIL import Image

    from common import images

    calls = []
    real_decode = imagecodecs.png_decode
    monkeypatch.setattr(imagecodecs, "png_decode", lambda data: calls.append(len(data)) or real_decode(data))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels[:, :20] //= 8  # some flat areas, so the encoder uses more than one row filter

    def png(image: Image.Image, **kwargs: object) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG", **kwargs)
        return buf.getvalue()

    plain = {"rgb": png(Image.fromarray(pixels)), "grey": png(Image.fromarray(pixels[..., 0])),
             "stored": png(Image.fromarray(pixels), compress_level=0)}
    converted = {"palette": png(Image.fromarray(pixels).convert("P")),
                 "rgba": png(Image.fromarray(pixels).convert("RGBA")),
                 "grey-16-bit": png(Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)),
                 "grey-transparent": png(Image.fromarray(pixels[..., 0]), transparency=5)}
    for name, data in plain.items():
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB"))
        calls.clear()
        np.testing.assert_array_equal(images.decode_image(data), expected, err_msg=name)
        assert calls == [len(data)], name  # decoded by libpng
    for name, data in converted.items():  # Pillow's conversions (alpha, 16-bit scaling, palette) apply
        calls.clear()
        assert images.decode_image(data).shape == (37, 53, 3) and calls == [], name
    corrupt = bytearray(plain["rgb"])
    corrupt[60:80] = bytes(20)  # inside the image data (chunk lengths intact, the CRC no longer matches)
    with pytest.raises(images.ImageDecodeError, match="corrupt or truncated"):
        images.decode_image(bytes(corrupt))


def _png_with_exif_after_data(w: int, h: int, orientation: int | None, corrupt_pixels: bool = False) -> bytes:
    """A PNG (w x h as stored) with an eXIf chunk between its image data and IEND, where the PNG
    specification allows it and Pillow's encoder never puts it."""
    import io
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        chunks.append((kind, bytes(reversed(body)) if corrupt_pixels and kind == b"IDAT" else body))
        pos += 12 + length
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        chunks.insert(len(chunks) - 1, (b"eXIf", exif.tobytes().removeprefix(b"Exif\x00\x00")))
    return data[:8] + b"".join(len(body).to_bytes(4, "big") + kind + body
                               + zlib.crc32(kind + body).to_bytes(4, "big") for kind, body in chunks)
