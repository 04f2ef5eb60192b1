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

import numba
import numpy as np
import torch

ProgressFn = Callable[[int], None]
HEAD_DIMS = 16  # leading principal coordinates tested first by the CPU coreset


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
    projected -= projected.mean(dim=0)  # distances unchanged; float32 |x|^2 - 2xc + |c|^2 more exact
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
    n, dim = x.shape
    # Rotate onto the principal axes: distances are unchanged, but the leading coordinates now carry
    # most of each distance, so a partial sum over them is a tight lower bound that rules out most
    # points after a few coordinates (exact partial-distance search).
    centred = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    _, vecs = np.linalg.eigh(centred.T.astype(np.float64) @ centred)
    y = np.ascontiguousarray(centred @ vecs[:, ::-1].astype(np.float32))
    del centred
    head = np.ascontiguousarray(y[:, :HEAD_DIMS])  # small enough to stay in cache across steps
    threads = max(1, numba.get_num_threads())
    best_val = np.empty(threads, dtype=np.float32)
    best_idx = np.empty(threads, dtype=np.int64)
    mind2 = np.full(n, np.inf, dtype=np.float32)  # squared distance of each point to its nearest centre
    assign = np.zeros(n, dtype=np.int32)  # that centre
    radius2 = np.zeros(k, dtype=np.float32)  # squared covering radius of each centre's cluster (upper bound)
    near = np.ones(k, dtype=np.bool_)
    selected = np.empty(k, dtype=np.int64)
    centers = np.empty((k, dim), dtype=np.float32)  # contiguous copies: streamed, not gathered
    new = start
    for i in range(k):
        selected[i] = new
        centers[i] = y[new]
        if i > 0:
            _near_clusters(centers[:i], radius2[:i], centers[i], near[:i])
        radius2[i] = _assign_step(head, y, y[new], i, near, assign, mind2, best_val, best_idx)
        if i % 256 == 255:
            _exact_radii(assign, mind2, radius2[: i + 1])
        new = int(best_idx[int(np.argmax(best_val))])
        if progress is not None and (i + 1) % 1024 == 0:
            progress(1024)
    return selected


@numba.njit(cache=True, parallel=True, fastmath=True)
def _near_clusters(centers, radius2, c, near):  # pragma: no cover - compiled
    """near[j] = the new centre c may take points from cluster j: d(c, c_j) < 2 r_j (triangle
    inequality), tested on a partial sum of squares first (a lower bound of the distance)."""
    dim = centers.shape[1]
    hd = min(dim, HEAD_DIMS)
    for j in numba.prange(len(centers)):
        limit = 4.0 * radius2[j] * (1.0 + 1e-4) + 1e-6
        s = np.float32(0.0)
        for d in range(hd):
            diff = centers[j, d] - c[d]
            s += diff * diff
        d = hd
        while d < dim and s < limit:
            diff = centers[j, d] - c[d]
            s += diff * diff
            d += 1
        near[j] = s < limit


@numba.njit(cache=True, parallel=True, fastmath=True)
def _assign_step(head, y, c, label, near, assign, mind2, best_val, best_idx):  # pragma: no cover
    """Move every point closer to c than to its centre into c's cluster; per-thread argmax of mind2.
    Returns the squared radius of c's new cluster."""
    n, dim = y.shape
    hd = head.shape[1]
    chunks = len(best_val)
    size = (n + chunks - 1) // chunks
    new_r2 = np.zeros(chunks, dtype=np.float32)
    for t in numba.prange(chunks):
        lo = t * size
        hi = min(n, lo + size)
        bv = np.float32(-1.0)
        bi = lo
        r2 = np.float32(0.0)
        for p in range(lo, hi):
            m = mind2[p]
            s = np.float32(0.0)
            for d in range(hd):  # branch-free, so it vectorises
                diff = head[p, d] - c[d]
                s += diff * diff
            if s < m and near[assign[p]]:
                d = hd
                while d < dim and s < m:
                    stop = min(dim, d + 16)
                    while d < stop:
                        diff = y[p, d] - c[d]
                        s += diff * diff
                        d += 1
                if s < m:
                    m = s
                    mind2[p] = s
                    assign[p] = label
                    if s > r2:
                        r2 = s
            if m > bv:
                bv = m
                bi = p
        best_val[t] = bv
        best_idx[t] = bi
        new_r2[t] = r2
    return new_r2.max()


@numba.njit(cache=True)
def _exact_radii(assign, mind2, radius2):  # pragma: no cover - compiled
    radius2[:] = 0.0
    for p in range(len(assign)):
        if mind2[p] > radius2[assign[p]]:
            radius2[assign[p]] = mind2[p]


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
