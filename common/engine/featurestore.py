"""Disk-backed store of patch features, so a fit holds one batch of them in memory, whatever its size.

A fit appends each batch's (n, D) float32 rows to a file in a temporary folder (`TMPDIR`, or the folder
given) and, once the coreset is chosen, reads the selected rows back in sequential blocks. The file is
read with plain reads, never mapped, so the rows read are not counted in the process's resident memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np

READ_BLOCK_ROWS = 65_536


class FeatureStore:
    """Append-only (N, D) float32 rows in a temporary file, deleted by `close()` (or the `with` block)."""

    def __init__(self, dim: int, folder: str | Path | None = None) -> None:
        self.dim = dim
        self.rows = 0
        self._dir = tempfile.TemporaryDirectory(prefix="totalrecall-features-", dir=folder)
        self.path = Path(self._dir.name) / "features.f32"
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()

    def __len__(self) -> int:
        return self.rows

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) rows, got {rows.shape}")
        self._file.write(rows.data)
        self.rows += len(rows)

    def gather(self, indices: np.ndarray, block_rows: int = READ_BLOCK_ROWS) -> np.ndarray:
        """rows[indices], in the order given, reading only the blocks that hold some of them."""
        self._file.flush()
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        buf = np.empty((min(block_rows, max(self.rows, 1)), self.dim), dtype=np.float32)
        row_bytes = self.dim * 4
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, self.rows, block_rows):
                lo, hi = np.searchsorted(wanted, [start, start + block_rows])
                if lo == hi:
                    continue
                n = min(block_rows, self.rows - start)
                f.seek(start * row_bytes)
                _read_exactly(f, memoryview(buf[:n]).cast("B"))
                out[order[lo:hi]] = buf[wanted[lo:hi] - start]
        return out

    def read_into(self, out: np.ndarray) -> np.ndarray:
        """Every row, in order, into the (N, D) float32 C-contiguous array `out` (no second copy)."""
        if out.shape != (self.rows, self.dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"expected a C-contiguous ({self.rows}, {self.dim}) float32 array")
        self._file.flush()
        with open(self.path, "rb", buffering=0) as f:
            _read_exactly(f, memoryview(out).cast("B"))
        return out

    def array(self) -> np.ndarray:
        """All rows as a read-only memory map (small stores and tests: mapped pages count as resident)."""
        self._file.flush()
        if self.rows == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))

    def close(self) -> None:
        self._file.close()
        self._dir.cleanup()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _read_exactly(f, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"feature store truncated: {got} of {len(view)} bytes read")
        got += n
