"""Exact nearest-neighbour search over the memory bank with faiss (GPU index when CUDA is present)."""

from __future__ import annotations

import faiss
import numpy as np
import torch


def gpu_available() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class NearestNeighbors:
    """L2 search returning true (not squared) distances, in batches of at most `batch` queries."""

    def __init__(self, bank: np.ndarray, use_gpu: bool | None = None, batch: int = 65_536):
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.bank = bank
        self.batch = batch
        index = faiss.IndexFlatL2(bank.shape[1])
        if (gpu_available() if use_gpu is None else use_gpu):
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, torch.cuda.current_device(), index)
        index.add(bank)
        self.index = index

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        dists = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.batch):
            d2, i = self.index.search(queries[start: start + self.batch], k)
            dists[start: start + self.batch] = np.sqrt(np.maximum(d2, 0.0))
            ids[start: start + self.batch] = i
        return dists, ids
