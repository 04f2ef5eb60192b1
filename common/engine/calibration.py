"""Thresholds from nominal held-out images, or F1-optimal ones from labelled validation images.

Nominal-only rule (the cold-start case, no defect labels): with s the held-out images' scores,
    threshold = max(max(s), mean(s) + 3 * std(s))
so no held-out nominal image is flagged and a wide nominal spread earns a wider margin. The pixel
threshold applies the same rule to each held-out image's maximum map value, so a nominal image
gets an empty mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.engine.metrics import PixelMetrics, f1_max

RULE = "max(max(s), mean(s) + 3 std(s)) over held-out nominal images"


def nominal_threshold(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no held-out scores to calibrate on")
    return float(max(v.max(), v.mean() + 3.0 * v.std()))


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bank ids, held-out ids): at least one held out when fraction > 0 and n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def f1_thresholds(image_scores: Sequence[float], labels: Sequence[int],
                  pixels: PixelMetrics) -> tuple[float, float]:
    """F1-optimal image and pixel thresholds from labelled validation images."""
    _, image_thr = f1_max(np.asarray(image_scores), np.asarray(labels))
    _, pixel_thr = pixels.pixel_f1_max()
    return float(image_thr), float(pixel_thr)
