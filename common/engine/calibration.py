"""Thresholds from nominal held-out images, or from labelled validation images (F1-optimal, or at a
false-alarm budget).

Nominal-only rule (the cold-start case, no defect labels): with s the held-out images' scores,
    threshold = max(max(s), mean(s) + 3 * std(s))
so no held-out nominal image is flagged and a wide nominal spread earns a wider margin. The pixel
threshold applies the same rule to each held-out image's maximum map value, so a nominal image
gets an empty mask.

A threshold placed at or just beside a score keeps a relative `SCORE_RTOL` from it: scores come from
float32 distances whose last bits depend on how the images were batched (faiss and BLAS sum in another
order), so the same image scored again can land one float32 step higher, and "just above the highest
nominal score" must still be above it then.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.engine.metrics import PixelMetrics, f1_max, score_from_code, score_to_code

RULE = "max(max(s), mean(s) + 3 std(s)) over held-out nominal images"
SCORE_RTOL = 1e-5  # about 100 float32 steps: well above batching noise, far below any score difference


def just_above(score: float) -> float:
    return float(max(np.nextafter(score, np.inf), score + SCORE_RTOL * abs(score)))


def just_below(score: float) -> float:
    return float(min(np.nextafter(score, -np.inf), score - SCORE_RTOL * abs(score)))


def nominal_threshold(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no held-out scores to calibrate on")
    return max(just_above(float(v.max())), float(v.mean() + 3.0 * v.std()))


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bank ids, held-out ids): at least one held out when fraction > 0 and n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def f1_image_threshold(image_scores: Sequence[float], labels: Sequence[int]) -> float:
    """F1-optimal image threshold from labelled validation images.

    Verdicts are `score > threshold`; f1_max's threshold t means `score >= t`, so the threshold is
    placed halfway between t and the next lower observed value."""
    scores = np.asarray(image_scores, dtype=np.float64)
    _, t = f1_max(scores, np.asarray(labels))
    if np.isnan(t):
        raise ValueError("an F1-optimal image threshold needs a defective image")
    below = scores[scores < t]
    return float((t + below.max()) / 2) if below.size else just_below(float(t))


def false_alarm_threshold(nominal_scores: Sequence[float], rate: float) -> float:
    """The lowest image threshold that flags at most `rate` of these nominal images: with the scores in
    descending order s_1 >= s_2 >= ..., k = floor(rate * n) of them may be flagged (fewer than n), and the
    threshold lies halfway between s_(k+1) and s_k, so the k highest are flagged and no other (just above
    s_1 when k = 0).

    Scores as close as `SCORE_RTOL` (ties: the same part twice) cannot be told apart reliably, so the
    threshold is never placed between them: it steps up to the nearest boundary where the scores are
    further apart, and flags fewer than k rather than more (the budget is a most). It keeps
    `SCORE_RTOL` from the scores on both sides."""
    s = np.sort(np.asarray(nominal_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no nominal scores to set a false-alarm threshold on")
    if not 0 <= rate < 1:
        raise ValueError(f"false-alarm rate must be in [0, 1), not {rate}")
    k = min(int(np.floor(rate * s.size + 1e-9)), s.size - 1)  # the tolerance must not reach n
    for j in range(k, 0, -1):  # flag the j highest: s_(j+1) = s[j] and s_j = s[j - 1] lie on either side
        low, high = just_above(float(s[j])), just_below(float(s[j - 1]))
        if low < high:
            return float(min(max((s[j] + s[j - 1]) / 2, low), high))
    return just_above(float(s[0]))


def f1_pixel_threshold(pixels: PixelMetrics) -> float:
    """F1-optimal pixel threshold over labelled maps: halfway between the best float16 bin and the next
    lower one (masks are `map > threshold`)."""
    _, pt = pixels.pixel_f1_max()
    if np.isnan(pt):
        raise ValueError("an F1-optimal pixel threshold needs defect pixels in the masks")
    code = int(score_to_code(np.array([pt]))[0])
    return float((pt + score_from_code(code - 1)) / 2) if code > 0 else just_below(float(pt))
