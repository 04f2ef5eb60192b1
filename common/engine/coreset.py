"""Greedy k-center coreset selection (PatchCore paper, section 3.2 and Algorithm 1).

Selection runs on a seeded Gaussian random projection of the features (Johnson-Lindenstrauss), starts
from a seeded random point and repeatedly adds the point farthest from the points selected so far.
Memory is O(N * d): only the projected features and a few length-N vectors are held, never N x N, and
never the full-dimension features: `StreamingProjection` projects them batch by batch as a fit extracts
them (in fixed row blocks, so streamed and in-memory projections have the same bits and select the same
coreset), and `greedy_from_projection` centres and rotates the projection in place.

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
from pathlib import Path

import numba
import numpy as np
import torch

from common.engine.featurestore import FeatureStore

ProgressFn = Callable[[int], None]
HEAD_DIMS = 16  # leading principal coordinates tested first by the CPU coreset
PROJECTION_CHUNK = 65_536  # rows per projection product, streamed or not (same bits either way)
ROTATION_CHUNK = 65_536  # rows per block of the CPU coreset's centring and rotation
POINTS_PER_THREAD = 1_000_000  # CPU coreset: one thread per this many points


def projection_matrix(in_dim: int, dim: int, seed: int) -> torch.Tensor | None:
    """The seeded (in_dim, dim) Gaussian matrix; None when dim >= in_dim (the features are kept)."""
    if dim >= in_dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, dim, generator=gen) / dim**0.5


def row_blocks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of `size` rows; the last one takes the remainder, so no block is shorter
    than `size` unless n is (BLAS then takes the same code path for every block, whatever n)."""
    starts = list(range(0, n, size)) or [0]
    if len(starts) > 1 and n - starts[-1] < size:
        starts.pop()
    return [(s, e) for s, e in zip(starts, starts[1:] + [n], strict=True)]


class StreamingProjection:
    """Seeded random projection of (n, D) rows fed batch by batch; only the (N, dim) result is kept.

    Rows are projected in blocks of `chunk` rows (the last block takes the remainder), so the result has
    the same bits however the rows were batched: a streamed fit selects the same coreset as an in-memory
    one. On the CPU the projected blocks wait in a temporary file (in `folder`) and `finish()` reads them
    into one array, so memory peaks at N x dim float32 once (plus at most 2 * chunk pending rows), not
    twice; on a GPU they stay in GPU memory.
    """

    def __init__(self, in_dim: int, dim: int, seed: int, device: torch.device | str = "cpu",
                 chunk: int = PROJECTION_CHUNK, folder: str | Path | None = None) -> None:
        matrix = projection_matrix(in_dim, dim, seed)
        self.device = torch.device(device)
        self.matrix = None if matrix is None else matrix.to(self.device)
        self.dim = in_dim if matrix is None else dim
        self.in_dim = in_dim
        self.chunk = chunk
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self._spill = FeatureStore(self.dim, folder) if self.device.type == "cpu" else None
        self._done: list[torch.Tensor] = []  # projected blocks kept on the device (GPU)
        self.rows = 0

    def add(self, rows: np.ndarray | torch.Tensor) -> None:
        """Append rows (the caller must not modify them afterwards: they may be kept until projected)."""
        t = torch.as_tensor(rows).to(self.device)
        if t.ndim != 2 or t.shape[1] != self.in_dim:
            raise ValueError(f"expected (n, {self.in_dim}) rows, got {tuple(t.shape)}")
        self._pending.append(t)
        self._pending_rows += len(t)
        self.rows += len(t)
        while self._pending_rows >= 2 * self.chunk:  # keep >= chunk rows back for the last block
            self._project(self.chunk)

    def _project(self, n: int) -> None:
        rows = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, rest = rows[:n], rows[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        out = head.float() if self.matrix is None else head.float() @ self.matrix
        if self._spill is not None:
            self._spill.append(out.numpy())
        else:
            self._done.append(out.clone() if out.data_ptr() == head.data_ptr() else out)

    def finish(self) -> torch.Tensor:
        """The (N, dim) float32 projection of every row added, in order (once: the buffers are freed)."""
        if self._pending_rows:
            self._project(self._pending_rows)
        if self._spill is not None:
            out = self._spill.read_into(np.empty((self.rows, self.dim), dtype=np.float32))
            self.close()
            return torch.from_numpy(out)
        result = torch.empty(self.rows, self.dim, dtype=torch.float32, device=self.device)
        start = 0
        while self._done:  # copy block by block, freeing each
            block = self._done.pop(0)
            result[start: start + len(block)] = block
            start += len(block)
        return result

    def close(self) -> None:
        """Delete the temporary file (also done by `finish()`)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def random_projection(features: np.ndarray | torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Project (N, D) features to (N, dim) with the seeded Gaussian matrix (see StreamingProjection)."""
    x = torch.as_tensor(features)
    proj = StreamingProjection(x.shape[1], dim, seed, x.device)
    for start in range(0, len(x), PROJECTION_CHUNK):
        proj.add(x[start: start + PROJECTION_CHUNK])
    return proj.finish()


def coreset_size(n: int, ratio: float, minimum: int = 0) -> int:
    """ratio x n features, but at least `minimum` (and at least one, at most all n)."""
    return max(1, min(n, max(round(n * ratio), minimum)))


def greedy_coreset(features: np.ndarray | torch.Tensor, ratio: float, projection_dim: int = 128,
                   seed: int = 0, progress: ProgressFn | None = None, minimum: int = 0) -> np.ndarray:
    """Indices (into `features`) of the greedy k-center coreset, in selection order (all of them, in their
    own order, when the coreset is the whole set). Fewer than k when fewer distinct features remain: the
    selection stops once every feature coincides with a selected one."""
    return greedy_from_projection(random_projection(features, projection_dim, seed), ratio, seed, progress,
                                  minimum)


def greedy_from_projection(projected: torch.Tensor, ratio: float, seed: int = 0,
                           progress: ProgressFn | None = None, minimum: int = 0) -> np.ndarray:
    """The greedy coreset of already projected features (`StreamingProjection.finish()`).

    Takes ownership of `projected`: it is centred and rotated in place, so the CPU selection needs no
    copy of it (memory: N x dim float32 plus O(N) vectors and the k selected centres)."""
    n = len(projected)
    k = coreset_size(n, ratio, minimum)
    if k == n:  # every feature (ratio 1, or a set below the minimum): no selection to make
        return np.arange(n)
    projected -= projected.mean(dim=0)  # distances unchanged; float32 |x|^2 - 2xc + |c|^2 more exact
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)).item())
    if projected.is_cuda:
        return _greedy_dense(projected, k, start, progress).cpu().numpy()
    return _greedy_pruned(projected.numpy(), k, start, progress, overwrite=True)


def _greedy_dense(x: torch.Tensor, k: int, start: int, progress: ProgressFn | None) -> torch.Tensor:
    sq = (x * x).sum(1)
    selected = torch.empty(k, dtype=torch.long, device=x.device)
    selected[0] = start
    center = torch.tensor(start, device=x.device)
    mind = torch.full((len(x),), float("inf"), device=x.device)
    gain = torch.empty(k, device=x.device)  # the distance each pick covers (read once, after the loop)
    gain[0] = float("inf")
    for i in range(1, k):
        c = x[center]
        d2 = (sq - 2 * (x @ c) + sq[center]).clamp_min_(0)
        torch.minimum(mind, d2, out=mind)
        center = torch.argmax(mind)
        selected[i] = center
        gain[i] = mind[center]
        if progress is not None and i % 1024 == 0:
            progress(1024)
    # every point coincided with a pick already, up to the rounding of |x|^2 - 2xc + |c|^2 (a few float32
    # epsilons of the largest |x|^2, measured): the rest of the picks are repeats
    covered = torch.nonzero(gain <= 16 * torch.finfo(x.dtype).eps * sq.max())
    return selected[: int(covered[0, 0])] if len(covered) else selected


def _principal_rotation(x: np.ndarray, out: np.ndarray) -> None:
    """out = x centred and rotated onto its principal axes, block by block (out may be x itself)."""
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    cov = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for s, e in row_blocks(len(x), ROTATION_CHUNK):
        np.subtract(x[s:e], mean, out=out[s:e])
        block = out[s:e].astype(np.float64)
        cov += block.T @ block
    _, vecs = np.linalg.eigh(cov)
    rotation = np.ascontiguousarray(vecs[:, ::-1].astype(np.float32))
    for s, e in row_blocks(len(x), ROTATION_CHUNK):
        out[s:e] = out[s:e] @ rotation


def _greedy_pruned(x: np.ndarray, k: int, start: int, progress: ProgressFn | None,
                   overwrite: bool = False) -> np.ndarray:
    """CPU greedy; `overwrite=True` reuses `x`'s memory for its rotated copy (x is then destroyed)."""
    n, dim = x.shape
    # Rotate onto the principal axes: distances are unchanged, but the leading coordinates now carry
    # most of each distance, so a partial sum over them is a tight lower bound that rules out most
    # points after a few coordinates (exact partial-distance search).
    y = x if overwrite and x.flags.c_contiguous and x.flags.writeable else np.empty((n, dim), np.float32)
    _principal_rotation(x, y)
    head = np.ascontiguousarray(y[:, :HEAD_DIMS])  # small enough to stay in cache across steps
    # Each step is two short parallel regions; below POINTS_PER_THREAD points per thread, waiting for
    # every thread at each step costs more than it saves (5x slower on a busy 2-core machine). The
    # selection does not depend on the thread count (ties go to the lowest index either way).
    threads = min(numba.get_num_threads(), max(1, n // POINTS_PER_THREAD))
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return _pruned_loop(head, y, k, start, threads, progress)
    finally:
        numba.set_num_threads(previous)


def _pruned_loop(head: np.ndarray, y: np.ndarray, k: int, start: int, threads: int,
                 progress: ProgressFn | None) -> np.ndarray:
    n, dim = y.shape
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
        top = int(np.argmax(best_val))
        if best_val[top] <= 0:  # every point coincides with a pick: more picks would only repeat them
            return selected[: i + 1]
        new = int(best_idx[top])
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
            # Most points belong to clusters c cannot take points from (on bottle, after the first
            # ~250 of 2,436 steps, under a fifth of the points are in near clusters; 12 % on
            # average): test that first, so their coordinates are not even read.
            if near[assign[p]]:
                s = np.float32(0.0)
                for d in range(hd):  # branch-free, so it vectorises
                    diff = head[p, d] - c[d]
                    s += diff * diff
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
