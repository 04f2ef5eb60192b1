"""Greedy k-center coreset selection (PatchCore paper, section 3.2 and Algorithm 1).

Selection runs on a seeded Gaussian random projection of the features (Johnson-Lindenstrauss), starts
from a seeded random point and repeatedly adds the point farthest from the points selected so far.
Memory is O(N * d): only the projected features and a few length-N vectors are held, never N x N.

Two exact implementations of the same greedy sequence:
- `_greedy_dense` (GPU): one fused distance update over all N points per step and an on-device argmax,
  with no host synchronisation inside the loop.
- `_greedy_pruned` (CPU): keeps each point's nearest selected centre and every centre's covering radius;
  by the triangle inequality a new centre c can only take points from a centre j with
  d(c, j) < 2 * radius(j), so each step only touches the few clusters around c. This gives the same
  selections as the dense loop (up to floating-point ties) with far less memory traffic per step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

ProgressFn = Callable[[int], None]


def random_projection(features: np.ndarray | torch.Tensor, dim: int, seed: int,
                      chunk: int = 262_144) -> torch.Tensor:
    """Project (N, D) features to (N, dim) with a seeded Gaussian matrix, chunk by chunk."""
    x = torch.as_tensor(features)
    n, d = x.shape
    if dim >= d:
        return x.float().clone()
    gen = torch.Generator().manual_seed(seed)
    proj = (torch.randn(d, dim, generator=gen) / dim**0.5).to(x.device)
    out = torch.empty(n, dim, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        out[start: start + chunk] = x[start: start + chunk].float() @ proj
    return out


def coreset_size(n: int, ratio: float) -> int:
    return max(1, min(n, round(n * ratio)))


def greedy_coreset(features: np.ndarray | torch.Tensor, ratio: float, projection_dim: int = 128,
                   seed: int = 0, progress: ProgressFn | None = None) -> np.ndarray:
    """Indices (into `features`) of the greedy k-center coreset, in selection order."""
    n = len(features)
    k = coreset_size(n, ratio)
    projected = random_projection(features, projection_dim, seed)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)).item())
    if projected.is_cuda:
        return _greedy_dense(projected, k, start, progress).cpu().numpy()
    return _greedy_pruned(projected.numpy(), k, start, progress)


def _greedy_dense(x: torch.Tensor, k: int, start: int, progress: ProgressFn | None) -> torch.Tensor:
    sq = (x * x).sum(1)
    selected = torch.empty(k, dtype=torch.long, device=x.device)
    selected[0] = start
    center = torch.tensor(start, device=x.device)
    mind = torch.full((len(x),), float("inf"), device=x.device)
    for i in range(1, k):
        c = x[center]
        d2 = (sq - 2 * (x @ c) + sq[center]).clamp_min_(0)
        torch.minimum(mind, d2, out=mind)
        center = torch.argmax(mind)
        selected[i] = center
        if progress is not None and i % 1024 == 0:
            progress(1024)
    return selected


def _greedy_pruned(x: np.ndarray, k: int, start: int, progress: ProgressFn | None) -> np.ndarray:
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    center_sq = np.empty(k, dtype=np.float32)
    radius = np.zeros(k, dtype=np.float32)  # covering radius of each centre's cluster
    assign = np.zeros(n, dtype=np.int64)  # nearest centre of each point
    mind = _dist(x, sq, x[start], sq[start])  # distance of each point to its nearest centre
    radius[0] = mind.max()
    selected = np.empty(k, dtype=np.int64)
    selected[0] = start
    centers[0], center_sq[0] = x[start], sq[start]
    for i in range(1, k):
        new = int(np.argmax(mind))
        selected[i] = new
        centers[i], center_sq[i] = x[new], sq[new]
        dcc = _dist(centers[:i], center_sq[:i], centers[i], center_sq[i])
        near = dcc < 2.0 * radius[:i] * (1 + 1e-5) + 1e-6  # clusters c may take points from
        idx = np.flatnonzero(near[assign])
        d = _dist(x[idx], sq[idx], centers[i], center_sq[i])
        moved = d < mind[idx]
        taken = idx[moved]
        mind[taken] = d[moved]
        assign[taken] = i
        # exact radii of the touched clusters (others are unchanged)
        radius[:i][near] = 0.0
        np.maximum.at(radius, assign[idx], mind[idx])
        if progress is not None and i % 1024 == 0:
            progress(1024)
    return selected


def _dist(points: np.ndarray, points_sq: np.ndarray, c: np.ndarray, c_sq: float) -> np.ndarray:
    d2 = points_sq - 2.0 * (points @ c) + c_sq
    return np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2)


def covering_radius(features: np.ndarray | torch.Tensor, selected: np.ndarray,
                    chunk: int = 65_536) -> float:
    """max over all points of the distance to the nearest selected point (lower is a better coreset)."""
    x = torch.as_tensor(features).float()
    s = x[torch.as_tensor(selected)]
    worst = 0.0
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start: start + chunk], s).min(dim=1).values
        worst = max(worst, float(d.max()))
    return worst
