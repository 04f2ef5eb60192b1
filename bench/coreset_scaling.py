"""Coreset time and peak memory against the number of patch features N.

    python bench/coreset_scaling.py --features /tmp/bottle_feats.npy --sizes 100000 400000 1600000 --ratios 0.1 0.01

Features: real EfficientNet-Lite0 patch features of MVTec bottle (saved by `--extract`), tiled with
small Gaussian jitter to reach N (so the data keeps the real features' geometry). Each size runs in a
fresh process, so peak RSS is that run's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import record


def make_features(source: Path, n: int, seed: int = 0) -> np.ndarray:
    base = np.load(source, mmap_mode="r")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), n)
    x = np.asarray(base[np.sort(idx)], dtype=np.float32)
    sd = 0.05 * float(base[:10000].std())
    for s in range(0, n, 65_536):  # jitter in float32 blocks: no float64 copy of the whole matrix
        x[s: s + 65_536] += rng.normal(0, sd, size=x[s: s + 65_536].shape).astype(np.float32)
    return x


def one(source: Path, n: int, ratio: float) -> dict:
    from common.engine.coreset import greedy_coreset

    x = make_features(source, n)
    before = _vm_mb("VmRSS")
    t = time.perf_counter()
    selected = greedy_coreset(x, ratio, 128, 0)
    seconds = time.perf_counter() - t
    return {"n": n, "dim": int(x.shape[1]), "ratio": ratio, "selected": int(len(selected)),
            "coreset_seconds": round(seconds, 2),
            "peak_rss_mb": round(_vm_mb("VmHWM"), 1),  # this process's own peak (no inherited floor)
            "rss_before_coreset_mb": round(before, 1),  # interpreter, libraries and the features
            "features_mb": round(x.nbytes / 2**20, 1)}


def _vm_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def extract(out: Path, data: Path) -> None:
    from common.engine import mvtec
    from common.engine.patchcore import PatchCore

    feats, _ = PatchCore().extract(mvtec.train_images(data, "bottle"))
    np.save(out, feats)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--features", type=Path, default=Path("bench/out/bottle_features.npy"))
    p.add_argument("--extract", action="store_true", help="extract bottle features first")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad"))
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.01])
    p.add_argument("--one", nargs=2, metavar=("N", "RATIO"))
    p.add_argument("--out", type=Path, default=Path("bench/out/coreset_scaling.jsonl"))
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.features, int(a.one[0]), float(a.one[1]))))
        return
    if a.extract or not a.features.exists():
        a.features.parent.mkdir(parents=True, exist_ok=True)
        extract(a.features, a.data)
    for ratio in a.ratios:
        for n in a.sizes:
            line = subprocess.run([sys.executable, __file__, "--features", str(a.features), "--one", str(n),
                                   str(ratio)], check=True, capture_output=True, text=True).stdout.strip()
            record(line, a.out)


if __name__ == "__main__":
    main()
