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
