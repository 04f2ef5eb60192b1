"""Tests for common.engine.metrics: expectations are derived by hand or by brute force in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from common.engine.calibration import f1_image_threshold, f1_pixel_threshold
from common.engine.metrics import (
    PixelMetrics,
    f1_max,
    image_auroc,
    score_from_code,
    score_to_code,
)

# ---------------------------------------------------------------- brute-force references


def pairwise_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos == neg) by counting every pair."""
    p, n = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def area_to(points: list[tuple[float, float]], limit: float) -> float:
    """Trapezoid area of a polyline with non-decreasing x, cut (linearly interpolated) at x = limit."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def brute_aupro(maps: list[np.ndarray], masks: list[np.ndarray | None], limit: float = 0.3) -> float:
    """AUPRO with an exact threshold at every distinct score, over all images at once."""
    negatives, regions = [], []
    for amap, mask in zip(maps, masks, strict=True):
        m = np.zeros(amap.shape, bool) if mask is None else mask.astype(bool)
        negatives.append(amap[~m])
        lab, k = ndimage.label(m, structure=np.ones((3, 3), int))  # 8-connected regions
        regions += [amap[lab == i] for i in range(1, k + 1)]
    neg = np.concatenate(negatives)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fpr = float(np.mean(neg >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    return area_to(points, limit) / limit


def random_maps(seed: int, n: int = 6, shape: tuple[int, int] = (9, 11)):
    """Maps with values in multiples of 1/8 (exact in float16, many ties) and blobby random masks."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        amap = rng.integers(0, 40, size=shape) / 8.0
        if i == 0:
            mask = None
        elif i == 1:
            mask = np.zeros(shape, bool)
        else:
            mask = rng.random(shape) < 0.25
            amap = amap + 2.0 * mask  # defects score higher on average
        maps.append(amap)
        masks.append(mask)
    return maps, masks


def split_pixels(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    pos = [a[m.astype(bool)] for a, m in zip(maps, masks, strict=True) if m is not None]
    neg = [a.ravel() if m is None else a[~m.astype(bool)] for a, m in zip(maps, masks, strict=True)]
    return np.concatenate(pos), np.concatenate(neg)


def fed(maps, masks) -> PixelMetrics:
    pm = PixelMetrics()
    for amap, mask in zip(maps, masks, strict=True):
        pm.update(amap, mask)
    return pm


# ---------------------------------------------------------------- image-level metrics


def test_image_auroc_perfect_and_reversed():
    assert image_auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert image_auroc(np.array([0.8, 0.9, 0.1, 0.2]), np.array([0, 0, 1, 1])) == 0.0


def test_image_auroc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won = 1 + 0 + 1 + 1 = 3 of 4
    assert image_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # positives 0.5, 0.9 vs negatives 0.2, 0.5: 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert image_auroc(np.array([0.2, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == pytest.approx(0.875)


def test_image_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 15, size=200) / 4.0  # plenty of ties
    labels = rng.random(200) < 0.3
    expected = pairwise_auroc(scores[labels], scores[~labels])
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_single_class_is_nan():
    assert math.isnan(image_auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_f1_max_by_hand():
    # P = 3. t=0.9: tp1 fp0 -> 2/4; t=0.8: tp1 fp1 -> 2/5; t=0.7: tp2 fp1 -> 4/6;
    # t=0.6: tp3 fp1 -> 6/7 (best); t=0.5: tp3 fp2 -> 6/8
    f1, thr = f1_max(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 1, 0]))
    assert f1 == pytest.approx(6 / 7)
    assert thr == 0.6
    # tied scores share a threshold: t=0.5: tp1 fp1 -> 2/4; t=0.2: tp2 fp1 -> 4/5 (best)
    f1, thr = f1_max(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1]))
    assert f1 == pytest.approx(0.8)
    assert thr == 0.2


# ---------------------------------------------------------------- quantisation helpers


def test_score_code_roundtrip_and_clipping():
    values = np.array([0.0, -0.0, -3.0, 0.125, 1.5, 1000.0, 1e9, np.inf])
    codes = score_to_code(values)
    back = [score_from_code(int(c)) for c in codes]
    assert back == [0.0, 0.0, 0.0, 0.125, 1.5, 1000.0, 65504.0, 65504.0]
    assert np.all(np.diff(codes.astype(np.int64)) >= 0)  # monotone in the score
    with pytest.raises(ValueError):
        score_to_code(np.array([np.nan]))


# ---------------------------------------------------------------- pixel AUROC / F1


def test_pixel_auroc_matches_pairwise():
    maps, masks = random_maps(1)
    pos, neg = split_pixels(maps, masks)
    assert fed(maps, masks).pixel_auroc() == pytest.approx(pairwise_auroc(pos, neg), abs=1e-12)


def test_pixel_auroc_by_group_is_pairwise_per_group_and_decomposes_the_total():
    maps, masks = random_maps(3)
    groups = ["a" if i % 2 else "b" for i in range(len(maps))]
    pm = PixelMetrics()
    for amap, mask, group in zip(maps, masks, groups, strict=True):
        pm.update(amap, mask, group)
    _, neg = split_pixels(maps, masks)  # every defect-free pixel, whatever the group
    by_group = pm.pixel_auroc_by_group()
    for g in ("a", "b"):
        pos_g, _ = split_pixels([m for m, gg in zip(maps, groups, strict=True) if gg == g],
                                [k for k, gg in zip(masks, groups, strict=True) if gg == g])
        assert by_group[g]["pixel_auroc"] == pytest.approx(pairwise_auroc(pos_g, neg), abs=1e-12)
    assert sum(v["positive_pixel_share"] for v in by_group.values()) == pytest.approx(1.0)
    weighted = sum(v["positive_pixel_share"] * v["pixel_auroc"] for v in by_group.values())
    assert weighted == pytest.approx(pm.pixel_auroc(), abs=1e-12)


def test_pixel_f1_max_matches_image_f1_on_concatenated_pixels():
    maps, masks = random_maps(2)
    pos, neg = split_pixels(maps, masks)
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    f1, thr = fed(maps, masks).pixel_f1_max()
    exp_f1, exp_thr = f1_max(scores, labels)
    assert f1 == pytest.approx(exp_f1)
    assert thr == exp_thr


def test_no_positive_pixels_gives_nan():
    """Without defect pixels (or images) every F1 is 0: no threshold is F1-optimal, and none may be taken
    for one (it was the highest bin seen, so a nominal map's top pixels came out as defects)."""
    pm = fed([np.ones((4, 4)), np.zeros((4, 4))], [None, np.zeros((4, 4), bool)])
    assert math.isnan(pm.pixel_auroc())
    assert math.isnan(pm.aupro())
    assert all(math.isnan(v) for v in PixelMetrics().pixel_f1_max())
    assert all(math.isnan(v) for v in pm.pixel_f1_max())
    assert pm.defect_pixels == 0
    assert all(math.isnan(v) for v in f1_max(np.array([0.2, 0.7]), np.array([0, 0])))
    assert f1_max(np.array([0.2, 0.7]), np.array([1, 1])) == (1.0, 0.2)  # no negatives: defined
    with pytest.raises(ValueError, match="needs defect pixels"):
        f1_pixel_threshold(pm)
    with pytest.raises(ValueError, match="needs a defective image"):
        f1_image_threshold([0.2, 0.7], [0, 0])


# ---------------------------------------------------------------- AUPRO

# One 4x4 image: region A = 3 pixels (top-left L), region B = 1 pixel; 12 negative pixels.
HAND_MASK = np.array(
    [
        [1, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
    ],
    bool,
)
# A scores 8, 6, 2; B scores 5; negatives 7, 4, 2, 2 and eight zeros.
HAND_MAP = np.array(
    [
        [8, 6, 7, 4],
        [2, 2, 2, 0],
        [0, 0, 0, 5],
        [0, 0, 0, 0],
    ],
    float,
)


def test_aupro_by_hand():
    # threshold: negatives >= t (of 12) -> FPR; A hit (of 3), B hit (of 1) -> PRO = mean
    #   t=8: FP0 -> 0     A 1/3 B 0 -> 1/6
    #   t=7: FP1 -> 1/12  PRO 1/6
    #   t=6: FP1 -> 1/12  A 2/3       -> 1/3
    #   t=5: FP1 -> 1/12  B 1         -> 5/6
    #   t=4: FP2 -> 2/12  PRO 5/6
    #   t=2: FP4 -> 4/12  A 1         -> 1
    #   t=0: FPR 1, PRO 1
    # curve (0,0) (0,1/6) (1/12,1/6) (1/12,1/3) (1/12,5/6) (1/6,5/6) (1/3,1) (1,1)
    # area to 0.3: 1/12*1/6 + 1/12*5/6 + trapezoid on [1/6, 0.3] where the segment (1/6,5/6)-(1/3,1)
    # has slope 1, so PRO(0.3) = 5/6 + (0.3 - 1/6) = 29/30.
    tail = (0.3 - 1 / 6) * (5 / 6 + 29 / 30) / 2  # = 0.12
    expected = (1 / 72 + 5 / 72 + tail) / 0.3  # = 61/90
    assert expected == pytest.approx(61 / 90)
    pm = fed([HAND_MAP], [HAND_MASK])
    assert pm.aupro(0.3) == pytest.approx(expected, abs=1e-12)
    assert pm.aupro() == pytest.approx(expected, abs=1e-12)
    # full-range AUPRO: area under the whole curve
    # = 1/72 + 5/72 + (1/3 - 1/6) * (5/6 + 1)/2 + (1 - 1/3) * 1
    assert pm.aupro(1.0) == pytest.approx(1 / 72 + 5 / 72 + (1 / 6) * (11 / 12) + 2 / 3, abs=1e-12)


def test_aupro_empty_mask_image_only_rescales_fpr():
    # adding a 4x4 defect-free image of zeros: 28 negatives, the zeros only appear at the last threshold,
    # so FP counts stay 0,1,1,1,2,4 but are now divided by 28; PRO values are unchanged.
    # curve (0,0) (0,1/6) (1/28,1/6) (1/28,1/3) (1/28,5/6) (2/28,5/6) (4/28,1) (1,1)
    expected = (
        (1 / 28) * (1 / 6)  # [0, 1/28] at PRO 1/6
        + (1 / 28) * (5 / 6)  # [1/28, 2/28] at PRO 5/6
        + (2 / 28) * (5 / 6 + 1) / 2  # [2/28, 4/28] rising to 1
        + (0.3 - 4 / 28) * 1  # [4/28, 0.3] at PRO 1
    ) / 0.3
    pm = fed([HAND_MAP, np.zeros((4, 4))], [HAND_MASK, None])
    assert pm.aupro() == pytest.approx(expected, abs=1e-12)
    # order of images and None vs all-zero mask do not matter
    pm2 = fed([np.zeros((4, 4)), HAND_MAP], [np.zeros((4, 4), bool), HAND_MASK])
    assert pm2.aupro() == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_and_inverted():
    perfect = np.where(HAND_MASK, 3.0, 1.0)
    assert fed([perfect], [HAND_MASK]).aupro() == pytest.approx(1.0)
    assert fed([perfect], [HAND_MASK]).pixel_auroc() == 1.0
    inverted = np.where(HAND_MASK, 1.0, 3.0)
    assert fed([inverted], [HAND_MASK]).aupro() == 0.0
    assert fed([inverted], [HAND_MASK]).pixel_auroc() == 0.0


def test_aupro_regions_are_8_connected():
    # as in the MVTec AD evaluation code: diagonal neighbours form one region (of 3 pixels, not 1 and 2)
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], bool)
    amap = np.array([[2.0, 0, 0], [0, 0, 0], [0, 0, 0]])  # one pixel of the region is hit first
    # t=2: FPR 0, PRO 1/3 (4-connectivity would give (1 + 0)/2 = 1/2); then t=0: (1, 1).
    # curve (0,0) (0,1/3) (1,1): area to 0.3 = 0.3 * (1/3 + (1/3 + 0.3 * 2/3)) / 2, normalised by 0.3
    expected = (1 / 3 + 1 / 3 + 0.2) / 2
    assert fed([amap], [mask]).aupro() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_streaming_aupro_matches_brute_force(seed: int, limit: float):
    maps, masks = random_maps(seed)
    assert fed(maps, masks).aupro(limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-9)


def test_update_rejects_bad_shapes():
    pm = PixelMetrics()
    with pytest.raises(ValueError):
        pm.update(np.zeros((4, 4)), np.zeros((4, 5), bool))
    with pytest.raises(ValueError):
        pm.update(np.zeros((2, 4, 4)), None)
