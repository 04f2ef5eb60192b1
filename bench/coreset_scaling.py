"""Coreset time and peak memory against the number of patch features N.

    python bench/coreset_scaling.py --features /tmp/bottle_feats.npy --sizes 100000 400000 1600000 --ratios 0.1 0.01

Features: real EfficientNet-Lite0 patch features of MVTec bottle (saved by `--extract`), tiled with
small Gaussian jitter to reach N (so the data keeps the real features' geometry). Each size runs in a
fresh process, so peak RSS is that run's own.

    python bench/coreset_scaling.py --device cuda --synthetic 300 --features /tmp/synth_feats.npy

`--device cuda` runs the selection on the GPU (the dense loop; peak GPU memory recorded too).
`--synthetic K` extracts the features of K generated 256 x 256 parts (`common.synthetic`) instead of
bottle, for a machine without the dataset: the GPU loop's time depends on N, not on the features' geometry.
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


def one(source: Path, n: int, ratio: float, device: str = "cpu") -> dict:
    import torch

    from common.engine.coreset import greedy_coreset

    x = make_features(source, n)
    cuda = device.startswith("cuda")
    features = torch.from_numpy(x).to(device) if cuda else x
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _vm_mb("VmRSS")
    t = time.perf_counter()
    selected = greedy_coreset(features, ratio, 128, 0)  # returns a numpy array: synchronised
    seconds = time.perf_counter() - t
    gpu = {"gpu": torch.cuda.get_device_name(), "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
           } if cuda else {}
    return {"n": n, "dim": int(x.shape[1]), "ratio": ratio, "selected": int(len(selected)), "device": device, **gpu,
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


def extract(out: Path, data: Path, synthetic: int = 0) -> None:
    from functools import partial

    from common.engine import mvtec
    from common.engine.patchcore import PatchCore
    from common.synthetic import nominal_image

    images = [partial(nominal_image, i, 256) for i in range(synthetic)] if synthetic \
        else mvtec.train_images(data, "bottle")
    feats, _ = PatchCore().extract(images)
    np.save(out, feats)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--features", type=Path, default=Path("bench/out/bottle_features.npy"))
    p.add_argument("--extract", action="store_true", help="extract bottle features first")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/mvtec_ad"))
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.01])
    p.add_argument("--synthetic", type=int, default=0, metavar="K", help="extract from K generated parts")
    p.add_argument("--device", default="cpu", help="where the selection runs (cuda: the GPU's dense loop)")
    p.add_argument("--one", nargs=2, metavar=("N", "RATIO"))
    p.add_argument("--out", type=Path, default=Path("bench/out/coreset_scaling.jsonl"))
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.features, int(a.one[0]), float(a.one[1]), a.device)))
        return
    if a.synthetic and a.features == p.get_default("features"):
        p.error("--synthetic needs --features PATH of its own (the default file holds bottle's features)")
    if a.extract or a.synthetic or not a.features.exists():
        a.features.parent.mkdir(parents=True, exist_ok=True)
        extract(a.features, a.data, a.synthetic)
    for ratio in a.ratios:
        for n in a.sizes:
            line = subprocess.run([sys.executable, __file__, "--features", str(a.features), "--one", str(n),
                                   str(ratio), "--device", a.device], check=True, capture_output=True, text=True).stdout.strip()
            record(line, a.out)


if __name__ == "__main__":
    main()
