"""Nearest-neighbour search over the memory bank with faiss: exact by default, IVF for very large banks.

- "flat": exact L2 search. On CPU it searches the bank array itself (`faiss.knn`, the same kernel as
  `IndexFlatL2`), so the bank is held once; on CUDA a faiss GPU flat index, or, where the installed faiss
  has no GPU support (faiss-cpu, e.g. on a CUDA version faiss-gpu wheels are not built for), a torch
  matrix product on the GPU (`TorchFlatL2`): a CPU search would cost a GPU worker most of its time.
- "ivf_flat" / "ivf_pq": inverted-file index (coarse k-means lists, `nprobe` searched per query), with
  the vectors stored as they are (exact distances to the candidates) or product-quantized (`pq_m` bytes a
  vector, approximate distances). Used only for banks of at least `index_min_bank` features.

An IVF index is trained with a fixed seed; what it needs to be rebuilt exactly is `IndexState`: the
trained, empty faiss index serialized to bytes (coarse centroids, PQ codebooks) and each bank row's
list. Loading adds the bank rows to their recorded lists, so the index is the same on every machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import faiss
import numpy as np
import torch

from common.engine.config import PatchCoreConfig

APPROXIMATE = ("ivf_flat", "ivf_pq")
REFINE_FACTOR = 8  # IVF-PQ: candidates re-ranked by exact distance per neighbour asked for


def gpu_available() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def flat_search(use_gpu: bool | None) -> str:
    """Where exact search runs: "faiss-gpu" (a faiss GPU index), "torch-gpu" (`TorchFlatL2`: CUDA with a
    faiss build without GPU support) or "faiss-cpu". `use_gpu`: the model's device is CUDA (None: use a
    faiss GPU index if there is one)."""
    if gpu_available() and use_gpu is not False:
        return "faiss-gpu"
    if use_gpu and torch.cuda.is_available():
        return "torch-gpu"
    return "faiss-cpu"


@cache
def gpu_resources(device: int) -> faiss.StandardGpuResources:
    """One faiss GPU context per device for the process: each reserves scratch memory, so a worker
    holding many models must not create one per model."""
    return faiss.StandardGpuResources()


@dataclass(frozen=True)
class IndexSpec:
    """The index a bank gets: its kind and, for IVF, resolved parameters."""

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    seed: int = 0

    @classmethod
    def for_bank(cls, config: PatchCoreConfig, bank_size: int, dim: int) -> IndexSpec:
        """The configured index if the bank is large enough for it, else exact search."""
        if config.index == "flat" or bank_size < max(1, config.index_min_bank):
            return cls()
        nlist = config.index_nlist or auto_nlist(bank_size)
        nlist = max(1, min(nlist, bank_size))
        check_pq_m(config, dim)
        pq_m = (config.index_pq_m or auto_pq_m(dim)) if config.index == "ivf_pq" else 0
        return cls(config.index, nlist, min(config.index_nprobe, nlist), pq_m, config.seed)

    @property
    def approximate(self) -> bool:
        return self.kind in APPROXIMATE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_pq_m(config: PatchCoreConfig, dim: int) -> None:
    """A set `index_pq_m` of an IVF-PQ index must divide the feature dimension (checked as a fit starts,
    not after its extraction and coreset: the dimension is known once the backbone is)."""
    if config.index == "ivf_pq" and config.index_pq_m and dim % config.index_pq_m:
        raise ValueError(f"index_pq_m={config.index_pq_m} must divide the feature dimension {dim}")


def auto_nlist(bank_size: int) -> int:
    """About 4 * sqrt(M) lists (faiss' rule of thumb), a power of two, with at least the 39 training
    points per list that faiss' k-means asks for."""
    nlist = 1 << max(0, round(np.log2(4 * np.sqrt(bank_size))))
    while nlist > 1 and bank_size < 39 * nlist:
        nlist //= 2
    return nlist


def auto_pq_m(dim: int) -> int:
    """The largest divisor of dim that is at most dim / 4: about four dimensions per byte."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


@dataclass
class IndexState:
    """What an IVF index needs to be rebuilt exactly: stored in the artifact."""

    spec: IndexSpec
    trained: np.ndarray  # uint8: faiss.serialize_index of the trained, empty index
    lists: np.ndarray  # int64 (M,): inverted list of each bank row


class NearestNeighbors:
    """L2 search returning true (not squared) distances, in batches of at most `batch` queries."""

    def __init__(self, bank: np.ndarray, use_gpu: bool | None = None, batch: int = 65_536,
                 spec: IndexSpec | None = None, state: IndexState | None = None, gpu_device: int | None = None):
        """`gpu_device`: the CUDA device the index goes to (the model's); None: the current one."""
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.gpu_device = gpu_device
        self.batch = batch
        self.spec = spec or (state.spec if state is not None else IndexSpec())
        self.state: IndexState | None = None
        where = flat_search(use_gpu)
        if self.spec.approximate:  # with a CPU-only faiss build an IVF index searches on the CPU
            index, self.state = _ivf(self.bank, self.spec, state)
        elif where == "faiss-gpu":
            index = faiss.IndexFlatL2(self.bank.shape[1])
            index.add(self.bank)
        elif where == "torch-gpu":
            index = TorchFlatL2(self.bank, torch.device("cuda", self._device()))
        else:
            index = None  # faiss.knn over self.bank: no second copy of the bank
        if where == "faiss-gpu" and index is not None:
            index = self._to_gpu(index)
        self.index = index

    def _device(self) -> int:
        return torch.cuda.current_device() if self.gpu_device is None else self.gpu_device

    def _to_gpu(self, index: faiss.Index) -> faiss.Index:
        device = self._device()
        self._resources = gpu_resources(device)
        try:
            return faiss.index_cpu_to_gpu(self._resources, device, index)
        except RuntimeError:  # e.g. a PQ code size the GPU kernels do not support: search on the CPU
            return index

    def __len__(self) -> int:
        return self.bank.shape[0]

    @property
    def nbytes(self) -> int:
        """Host memory held: the bank, plus a CPU IVF index's lists (codes and ids) and centroids."""
        n = int(self.bank.nbytes)
        if self.state is not None:
            try:
                ivf = faiss.extract_index_ivf(self.index)
            except RuntimeError:  # a GPU index: its lists are in GPU memory
                return n
            n += ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4
        return n

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        dists = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.batch):
            q = queries[start: start + self.batch]
            if self.index is None:
                candidates = faiss.knn(q, self.bank, k)[1]
            elif self.spec.kind == "ivf_pq":  # re-ranked by their exact distance below
                candidates = self.index.search(q, min(len(self), k * REFINE_FACTOR))[1]
            else:
                candidates = self.index.search(q, k)[1]
            # faiss computes |q|^2 + |b|^2 - 2 q.b in float32: near a bank row (a near-duplicate image) its
            # error exceeds the distance itself and varies with the batch. The neighbours' distances are
            # computed again from their differences, exact, and the same in any batch and on any device.
            d2, i = _refine(q, candidates, self.bank, k)
            missing = (i < 0).any(axis=1)
            if missing.any():  # an IVF search found fewer than k rows in its lists: exact search for those
                d2[missing], i[missing] = _refine(q[missing], faiss.knn(q[missing], self.bank, k)[1], self.bank, k)
            dists[start: start + self.batch] = np.sqrt(np.maximum(d2, 0.0))
            ids[start: start + self.batch] = i
        return dists, ids


class TorchFlatL2:
    """Exact L2 search by matrix product on a torch device, with faiss' `search(queries, k)` signature:
    the GPU search of a faiss build without GPU support. Distances are |b|^2 - 2 q.b in float32 (the
    query's own |q|^2 does not change its order); `NearestNeighbors.search` recomputes the chosen rows'."""

    BLOCK = 1 << 26  # distance matrix elements per block of queries (256 MiB of float32)

    def __init__(self, bank: np.ndarray, device: torch.device):
        self.bank = torch.from_numpy(bank).to(device)
        self.sq = (self.bank * self.bank).sum(1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.bank.device)
        if not len(q):
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        rows = max(1, self.BLOCK // max(1, len(self.bank)))
        d2, ids = [], []
        for s in range(0, len(q), rows):
            block = torch.addmm(self.sq[None], q[s: s + rows], self.bank.T, alpha=-2)
            d, i = block.topk(k, dim=1, largest=False, sorted=True)
            d2.append(d)
            ids.append(i)
        return torch.cat(d2).cpu().numpy(), torch.cat(ids).cpu().numpy().astype(np.int64)


def _refine(queries: np.ndarray, candidates: np.ndarray, bank: np.ndarray, k: int,
            block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The k candidates (ids into `bank`, -1 = none) nearest to each query by exact squared distance, and
    those distances (computed from the differences, so a query at a bank row is at 0)."""
    d2 = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), block):
        c = candidates[s: s + block]
        diff = bank[np.maximum(c, 0)] - queries[s: s + block, None, :]
        dist = np.einsum("qkd,qkd->qk", diff, diff)
        dist[c < 0] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        d2[s: s + block] = np.take_along_axis(dist, order, axis=1)
        ids[s: s + block] = np.where(np.isinf(d2[s: s + block]), -1, np.take_along_axis(c, order, axis=1))
    return d2, ids


def _ivf(bank: np.ndarray, spec: IndexSpec, state: IndexState | None) -> tuple[faiss.Index, IndexState]:
    """An IVF index over `bank`: trained now with the spec's seed, or rebuilt from `state`."""
    if state is None:
        index = _untrained(bank.shape[1], spec)
        index.train(bank)
        trained = faiss.serialize_index(index)
        _, lists = index.quantizer.search(bank, 1)
        state = IndexState(spec, trained, np.ascontiguousarray(lists[:, 0], dtype=np.int64))
    else:
        index = faiss.deserialize_index(np.ascontiguousarray(state.trained))
        ivf = faiss.extract_index_ivf(index)
        if not ivf.is_trained or ivf.ntotal or ivf.d != bank.shape[1] or ivf.nlist != spec.nlist:
            raise ValueError("stored index does not match the bank and its parameters")
        if state.lists.shape != (len(bank),) or (len(bank) and not 0 <= state.lists.min() <= state.lists.max()
                                                  < spec.nlist):
            raise ValueError("stored inverted-list assignment does not match the bank")
    lists = np.ascontiguousarray(state.lists, dtype=np.int64)
    index.add_core(len(bank), faiss.swig_ptr(bank), None, faiss.swig_ptr(lists))
    index.nprobe = spec.nprobe
    return index, state


def _untrained(dim: int, spec: IndexSpec) -> faiss.Index:
    quantizer = faiss.IndexFlatL2(dim)
    if spec.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_L2)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_m, 8)
        index.pq.cp.seed = spec.seed
    index.cp.seed = spec.seed
    return index
