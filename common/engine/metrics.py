"""Evaluation metrics: image AUROC / F1-max and a streaming pixel-metrics accumulator.

Pixel metrics are computed from histograms of float16-quantised scores, so memory is O(65536)
regardless of how many anomaly maps are seen, and results are exact up to that quantisation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

N_BINS = 1 << 16
MAX_SCORE = 65504.0  # largest finite float16


def _as_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("empty scores")
    return s, y


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U, ties count 1/2); labels 1 = anomalous. NaN if a class is empty."""
    s, y = _as_binary(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(rankdata(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds ``score >= t`` at every distinct score; returns (f1, t), highest t on ties.
    (nan, nan) without positives: every F1 is 0, and no threshold is better than another."""
    s, y = _as_binary(scores, labels)
    if not y.any():
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order])
    fp = np.arange(1, s.size + 1) - tp
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))  # last index of each value
    tp, fp = tp[ends], fp[ends]
    f1 = 2.0 * tp / (tp + fp + int(y.sum()))
    best = int(np.argmax(f1))
    return float(f1[best]), float(s_sorted[ends[best]])


def score_to_code(scores: np.ndarray) -> np.ndarray:
    """Quantise scores (clipped to [0, 65504]) to float16 bit patterns; the code is monotone in the score."""
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float32)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    half = np.clip(s, 0.0, MAX_SCORE).astype(np.float16)
    return half.view(np.uint16) & np.uint16(0x7FFF)  # drop the sign bit: -0.0 becomes +0.0


def score_from_code(code: int) -> float:
    """Inverse of :func:`score_to_code` for one bin: the float16 score value of that bin."""
    return float(np.array(code, dtype=np.uint16).view(np.float16))


def _hist_auroc(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float:
    """ROC AUC of positive vs negative score histograms over the same bins (ties within a bin count 1/2)."""
    n_pos, n_neg = int(pos_hist.sum()), int(neg_hist.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg = neg_hist.astype(np.float64)
    neg_below = np.cumsum(neg) - neg
    wins = np.sum(pos_hist * (neg_below + 0.5 * neg))
    return float(wins / (float(n_pos) * float(n_neg)))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x non-decreasing) from x[0] to x_max, interpolating at x_max."""
    keep = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:keep], y[:keep]
    if keep < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[keep - 1], x[keep], y[keep - 1], y[keep]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


# Defect regions for AUPRO are 8-connected, as in the MVTec AD evaluation code (a pixel touching a defect
# only diagonally belongs to it, and does not count as a region of its own).
REGION_CONNECTIVITY = np.ones((3, 3), dtype=int)


class PixelMetrics:
    """Streaming pixel AUROC, AUPRO and F1-max over float16-quantised anomaly maps (maps are not stored)."""

    def __init__(self) -> None:
        self.pos_hist = np.zeros(N_BINS, dtype=np.int64)
        self.neg_hist = np.zeros(N_BINS, dtype=np.int64)
        self.pro_weight = np.zeros(N_BINS, dtype=np.float64)  # per bin: sum of 1/|R| over region pixels
        self.region_count = 0
        self.pos_hist_by_group: dict[str, np.ndarray] = {}  # defect pixels per group (e.g. defect type)

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray | None = None, group: str | None = None) -> None:
        """Add one (H, W) score map and its defect mask (None or all-zero: defect-free image); `group`
        (e.g. the defect type) also counts the defect pixels under that name for `pixel_auroc_by_group`."""
        code = score_to_code(anomaly_map)
        if code.ndim != 2:
            raise ValueError(f"anomaly_map must be 2-D, got shape {code.shape}")
        if mask is None:
            self.neg_hist += np.bincount(code.ravel(), minlength=N_BINS)
            return
        m = np.asarray(mask).astype(bool)
        if m.shape != code.shape:
            raise ValueError(f"mask shape {m.shape} != anomaly_map shape {code.shape}")
        self.neg_hist += np.bincount(code[~m], minlength=N_BINS)
        positives = np.bincount(code[m], minlength=N_BINS)
        self.pos_hist += positives
        if group is not None:
            self.pos_hist_by_group.setdefault(group, np.zeros(N_BINS, dtype=np.int64))
            self.pos_hist_by_group[group] += positives
        regions, n_regions = ndimage.label(m, structure=REGION_CONNECTIVITY)
        if n_regions:
            inv_size = 1.0 / np.bincount(regions.ravel())[regions[m]]
            self.pro_weight += np.bincount(code[m], weights=inv_size, minlength=N_BINS)
            self.region_count += int(n_regions)

    @property
    def defect_pixels(self) -> int:
        """How many defect (mask) pixels were seen."""
        return int(self.pos_hist.sum())

    def pixel_auroc(self) -> float:
        """ROC AUC over all pixels seen (ties within a bin count 1/2); NaN without positives or negatives."""
        return _hist_auroc(self.pos_hist, self.neg_hist)

    def pixel_auroc_by_group(self) -> dict[str, dict[str, float]]:
        """Per group: the AUROC of its defect pixels against every defect-free pixel, and its share of all
        defect pixels. The overall pixel AUROC is exactly the share-weighted sum of these AUROCs, so a group
        with most of the defect pixels bounds it."""
        n_pos = max(1, int(self.pos_hist.sum()))
        return {g: {"pixel_auroc": _hist_auroc(h, self.neg_hist), "positive_pixel_share": int(h.sum()) / n_pos}
                for g, h in sorted(self.pos_hist_by_group.items())}

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Area under the PRO-vs-FPR curve up to fpr_limit, normalised by fpr_limit (perfect = 1.0)."""
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        n_neg = int(self.neg_hist.sum())
        if self.region_count == 0 or n_neg == 0:
            return float("nan")
        # threshold at each bin from high to low: everything with code >= bin is predicted positive
        fpr = np.cumsum(self.neg_hist[::-1]) / n_neg
        pro = np.cumsum(self.pro_weight[::-1]) / self.region_count
        fpr = np.concatenate(([0.0], fpr))
        pro = np.concatenate(([0.0], np.minimum(pro, 1.0)))
        return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit

    def pixel_f1_max(self) -> tuple[float, float]:
        """Best pixel F1 over bin thresholds and that threshold as a score; (nan, nan) without defect pixels
        (every F1 is 0: no threshold is better than another), e.g. before any update."""
        if not self.defect_pixels:
            return float("nan"), float("nan")
        used = np.flatnonzero((self.pos_hist + self.neg_hist) > 0)[::-1]  # occupied bins, high to low
        tp = np.cumsum(self.pos_hist[::-1])[N_BINS - 1 - used]
        fp = np.cumsum(self.neg_hist[::-1])[N_BINS - 1 - used]
        f1 = 2.0 * tp / (tp + fp + int(self.pos_hist.sum()))
        best = int(np.argmax(f1))
        return float(f1[best]), score_from_code(int(used[best]))
