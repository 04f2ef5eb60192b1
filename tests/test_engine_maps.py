"""The anomaly map as two matrix products equals upsample -> Gaussian blur -> resize to the region."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engine.maps import anomaly_map, axis_operator
from common.engine.scoring import smooth_maps, to_image_resolution


@pytest.mark.parametrize(("grid", "input_hw", "region_hw", "sigma"), [
    ((28, 28), (224, 224), (256, 256), 4.0),   # upsized region
    ((20, 38), (160, 304), (900, 1700), 4.0),  # keep_aspect input of a large image
    ((28, 28), (224, 224), (100, 90), 4.0),    # downsized region (center crop box)
    ((28, 28), (224, 224), (224, 224), 0.0),   # no smoothing
    ((2, 2), (16, 16), (17, 17), 4.0),         # kernel wider than the input
    ((1, 3), (16, 48), (5, 7), 2.5),
])
def test_anomaly_map_equals_smooth_then_resize(grid, input_hw, region_hw, sigma) -> None:
    p = np.random.default_rng(0).random(grid, dtype=np.float32) * 10
    reference = to_image_resolution(smooth_maps(torch.from_numpy(p)[None], input_hw, sigma)[0], region_hw)
    out = anomaly_map(p, input_hw, region_hw, sigma)
    assert out.shape == reference.shape == region_hw and out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_axis_operator_rows_sum_to_one_and_are_cached() -> None:
    a = axis_operator(28, 224, 300, 4.0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-5)  # a constant map stays constant
    assert axis_operator(28, 224, 300, 4.0) is a and not a.flags.writeable
