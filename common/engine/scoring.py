"""From patch distances to image scores (paper Eq. 7) and smoothed full-resolution anomaly maps."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from common.engine.knn import NearestNeighbors


def reweighted_image_score(test_feature: np.ndarray, nearest_id: int, bank_neighbors: np.ndarray,
                           bank: np.ndarray, max_distance: float) -> float:
    """Paper Eq. 7: s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)} exp|m_test - m|) * s*.

    `max_distance` is s*, or what stands for it (`image_scores`' mean of the highest patch distances).

    `bank_neighbors` are the ids of the b nearest bank features of m* (m* itself among them, as the
    nearest of itself). A test patch whose nearest bank feature sits in a sparse region of the bank
    (its neighbours are far from the test patch too) keeps more of its score.
    """
    if len(bank_neighbors) < 2:  # a bank of one row: m* alone would weigh every score to 0
        return max_distance
    test = test_feature.astype(np.float64)
    d_star = float(np.linalg.norm(test - bank[nearest_id].astype(np.float64)))
    d_all = np.linalg.norm(bank[bank_neighbors].astype(np.float64) - test, axis=1)
    top = max(d_star, float(d_all.max()))  # softmax-style shift; the ratio is unchanged
    weight = 1.0 - math.exp(d_star - top) / float(np.exp(d_all - top).sum())
    return max(0.0, weight) * max_distance


def image_scores(features: np.ndarray, patch_dist: np.ndarray, patch_ids: np.ndarray,
                 index: NearestNeighbors, num_neighbors: int, top_fraction: float = 0.0,
                 counted: int | None = None) -> np.ndarray:
    """Image scores for a batch: features (B, P, D), 1-NN distances/ids (B, P).

    The paper's score is Eq. 7's weight of the worst patch m_test times its distance s*. With
    `top_fraction` > 0, s* is replaced by the mean of the highest `top_fraction` of the patch distances
    (at least one; of `counted` patches, default all P: a region of interest counts only its own), the
    weight still the worst patch's. A single patch's distance is the noisiest statistic of a nominal image;
    the mean of its few highest is steadier, and a defect raises a neighbourhood of patches, not one."""
    worst = patch_dist.argmax(axis=1)
    rows = np.arange(len(worst))
    s_star = top_mean(patch_dist, top_count(top_fraction, patch_dist.shape[1] if counted is None else counted))
    if num_neighbors == 0:
        return s_star
    m_star = patch_ids[rows, worst]
    _, neighbors = index.search(index.bank[m_star], min(num_neighbors, len(index)))
    return np.array([
        reweighted_image_score(features[b, worst[b]], int(m_star[b]), neighbors[b], index.bank,
                               float(s_star[b]))
        for b in range(len(worst))
    ])


def top_count(fraction: float, patches: int) -> int:
    """How many of `patches` patch distances make the image score: `fraction` of them, at least one (0: the
    highest alone, the paper's s*)."""
    return max(1, round(fraction * patches))


def top_mean(patch_dist: np.ndarray, k: int) -> np.ndarray:
    """(B, P) distances -> (B,) mean of each row's k highest, in float64."""
    k = min(k, patch_dist.shape[1])
    return np.partition(patch_dist, -k, axis=1)[:, -k:].astype(np.float64).mean(axis=1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's default truncate=4
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def grid_span(cells: int, n_input: int, stride: int | None) -> int:
    """Input pixels a feature grid's `cells` cover along a side of `n_input` pixels: cells x `stride` (the
    backbone pads an input side that is not a multiple of its stride, so the last cell reaches past the
    input's edge; each cell stays `stride` pixels wide); without a stride, the input side itself."""
    return n_input if stride is None else max(n_input, cells * stride)


def smooth_maps(patch_scores: torch.Tensor, input_hw: tuple[int, int], sigma: float,
                span_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H_in, W_in): bilinear upsampling to the `span_hw` input pixels the grid
    covers (`grid_span`; default the input), cut to the input, then a separable Gaussian blur
    with scipy.ndimage.gaussian_filter's default border (mode "reflect": d c b a | a b c d | d c b a),
    sigma in model-input pixels (the paper's sigma = 4)."""
    span_hw = tuple(span_hw or input_hw)
    maps = F.interpolate(patch_scores[:, None], size=span_hw, mode="bilinear", align_corners=False)
    maps = maps[:, 0, : input_hw[0], : input_hw[1]]
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps.device)
    r = len(k) // 2
    rows = maps.index_select(1, _reflect_index(maps.shape[1], r, maps.device))
    maps = F.conv2d(rows[:, None], k.reshape(1, 1, -1, 1))[:, 0]
    cols = maps.index_select(2, _reflect_index(maps.shape[2], r, maps.device))
    return F.conv2d(cols[:, None], k.reshape(1, 1, 1, -1))[:, 0]


def _reflect_index(n: int, r: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a side of length n padded by r on both ends (scipy reflect)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def to_image_resolution(smoothed: torch.Tensor, box_hw: tuple[int, int]) -> np.ndarray:
    """One (H_in, W_in) map -> (H, W) float32 map at the region's own resolution (bilinear)."""
    out = F.interpolate(smoothed[None, None], size=box_hw, mode="bilinear", align_corners=False)
    return out[0, 0].cpu().numpy()
