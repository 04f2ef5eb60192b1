"""What every benchmark script shares: best-of-N timing and writing its result as one JSON line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best-of-`repeat` (wall, cpu) seconds of fn()."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def record(result: dict[str, Any] | str, out: Path) -> None:
    """Print a result (a dict, or a line already in JSON) and append it to the JSON-lines file `out`."""
    line = result if isinstance(result, str) else json.dumps(result)
    print(line, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(line + "\n")


class HostShares:
    """Shares of the whole machine's CPU time (all cores) that were idle and that the hypervisor stole,
    from construction to `shares()`. On a shared VM a timing taken while `steal` is high is slow for
    reasons outside the code; record it next to the timing. Empty where /proc/stat does not exist."""

    FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

    def __init__(self) -> None:
        self._start = self._read()

    @classmethod
    def _read(cls) -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(v) for v in f.readline().split()[1: 1 + len(cls.FIELDS)]]
        except (OSError, ValueError):
            return None

    def shares(self) -> dict[str, float]:
        end = self._read()
        if self._start is None or end is None:
            return {}
        delta = dict(zip(self.FIELDS, (b - a for a, b in zip(self._start, end, strict=True)), strict=True))
        total = sum(delta.values()) or 1
        return {"idle_share": round(delta["idle"] / total, 3), "steal_share": round(delta["steal"] / total, 3)}
