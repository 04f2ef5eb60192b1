"""The anomaly map as two matrix products equals upsample -> Gaussian blur -> resize to the region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engine.maps import anomaly_map, axis_operator
from common.engine.scoring import grid_span, smooth_maps, to_image_resolution


@pytest.mark.parametrize(("grid", "input_hw", "region_hw", "sigma", "stride"), [
    ((28, 28), (224, 224), (256, 256), 4.0, None),   # upsized region
    ((20, 38), (160, 304), (900, 1700), 4.0, 8),     # keep_aspect input of a large image
    ((28, 28), (224, 224), (100, 90), 4.0, None),    # downsized region (center crop box)
    ((28, 28), (224, 224), (224, 224), 0.0, None),   # no smoothing
    ((2, 2), (16, 16), (17, 17), 4.0, None),         # kernel wider than the input
    ((1, 3), (16, 48), (5, 7), 2.5, None),
    ((13, 5), (100, 36), (300, 90), 4.0, 8),         # input sides not multiples of the stride
])
def test_anomaly_map_equals_smooth_then_resize(grid, input_hw, region_hw, sigma, stride) -> None:
    p = np.random.default_rng(0).random(grid, dtype=np.float32) * 10
    span = tuple(grid_span(c, n, stride) for c, n in zip(grid, input_hw, strict=True))
    reference = to_image_resolution(smooth_maps(torch.from_numpy(p)[None], input_hw, sigma, span)[0], region_hw)
    out = anomaly_map(p, input_hw, region_hw, sigma, stride)
    assert out.shape == reference.shape == region_hw and out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_axis_operator_rows_sum_to_one_and_are_cached() -> None:
    a = axis_operator(28, 224, 300, 4.0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-5)  # a constant map stays constant
    assert axis_operator(28, 224, 300, 4.0) is a and not a.flags.writeable


@pytest.mark.parametrize("side", [100, 36, 96])
def test_a_hot_cell_lands_on_its_own_pixels_whatever_the_input_side(side: int) -> None:
    """The stride-8 grid of a 100 px input has 13 cells covering 104 px (the backbone pads): cell i is
    input pixels 8i..8i+7 however far the last cell reaches past the input, not a 13th of 100 px."""
    cells = -(-side // 8)
    for i in (1, cells // 2, cells - 2):
        p = np.zeros((cells, cells), dtype=np.float32)
        p[i, 1] = 1.0
        profile = anomaly_map(p, (side, side), (side, side), 0.0, stride=8).sum(axis=1)
        assert (np.arange(side) * profile).sum() / profile.sum() == pytest.approx(8 * i + 3.5, abs=1e-3)
