"""Patch distances -> anomaly map at the image's resolution as two small matrix products.

`scoring.smooth_maps` (bilinear upsampling to the input pixels the grid covers, cut to the model input,
Gaussian blur with scipy's reflect border)
followed by `scoring.to_image_resolution` (bilinear resize to the image region) is linear and separable:
map = A_y @ P @ A_x.T for the (h, w) patch distances P, with A = resize . blur . upsample along one axis.
Each A is built once per (grid, input, region) size by running those same functions on unit vectors, so
the result is theirs up to float rounding, at a fraction of the cost (no full-size intermediate maps).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from common.engine.scoring import grid_span, smooth_maps, to_image_resolution


@lru_cache(maxsize=64)
def axis_operator(n_patch: int, n_input: int, n_region: int, sigma: float,
                  stride: int | None = None) -> np.ndarray:
    """(n_region, n_patch) float32 matrix taking one axis of the patch grid (cells `stride` input pixels
    apart, see `grid_span`) to the image region."""
    basis = torch.eye(n_patch, dtype=torch.float32).reshape(n_patch, n_patch, 1)
    span = (grid_span(n_patch, n_input, stride), 1)
    smoothed = smooth_maps(basis, (n_input, 1), sigma, span)[:, :, 0].T  # (n_input, n_patch): column j from e_j
    out = to_image_resolution(smoothed.contiguous(), (n_region, n_patch))  # the columns are resized as is
    out.setflags(write=False)
    return out


def anomaly_map(patch_scores: np.ndarray, input_hw: tuple[int, int], region_hw: tuple[int, int],
                sigma: float, stride: int | None = None) -> np.ndarray:
    """(h, w) patch scores -> (H, W) float32 smoothed map over the image region. `stride`: the grid's, in
    input pixels (`PatchFeatures.stride`); without it the grid is stretched over the input, which is
    right only for an input whose sides are multiples of the stride."""
    h, w = patch_scores.shape
    a_y = axis_operator(h, input_hw[0], region_hw[0], float(sigma), stride)
    a_x = axis_operator(w, input_hw[1], region_hw[1], float(sigma), stride)
    p = np.asarray(patch_scores, dtype=np.float32)
    if region_hw[0] * w <= h * region_hw[1]:  # cheaper order of the two products
        return np.ascontiguousarray((a_y @ p) @ a_x.T)
    return np.ascontiguousarray(a_y @ (p @ a_x.T))
