"""Peak memory and time of `PatchCore.fit` against the number of training images (streamed features).

    python bench/fit_memory.py --sizes 500 1000 3000 --ratio 0.1          # one fresh process per size
    python bench/fit_memory.py --check 300                                # streamed == in-memory bank
    python bench/fit_memory.py --sizes 40 --image-side 256 --upscale 12 --holdout-fraction 0.5  # large PNGs

Images are generated on the fly (`common.synthetic.nominal_image(seed, size=256)` behind callables), so
they are never all in memory. Each size runs in a fresh subprocess and reports that process's peak RSS
(`ru_maxrss`, and `VmHWM`), wall and CPU (`process_time`, all threads) seconds, the fit's own timings and the load
average, since CPU figures on a shared machine depend on what else runs. `--check` fits once (streamed)
and once from an in-memory feature matrix, and compares the banks and their covering radii.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from benchlib import record

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Peak RSS of this process (ru_maxrss; Linux keeps the forking parent's RSS as a floor across exec,
    so the parent of the runs stays small)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hwm_mb() -> float:
    """Peak RSS of this process's own address space (VmHWM: starts at exec, no inherited floor)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _images(n: int, size: int, upscale: int = 1) -> list:
    """Generated on the fly; with `upscale` > 1, PNG bytes of each image enlarged `upscale` times (pixel
    repetition: cheap to make, decoded by the fit like real files, and the maps are that large)."""
    from common.synthetic import nominal_image, png_bytes

    if upscale == 1:
        return [partial(nominal_image, i, size) for i in range(n)]
    return [png_bytes(np.kron(nominal_image(i, size), np.ones((upscale, upscale, 1), np.uint8)), compress_level=1)
            for i in range(n)]


def one(n: int, ratio: float, size: int, device: str, holdout: float, upscale: int) -> dict:
    from common.engine.config import PatchCoreConfig
    from common.engine.patchcore import PatchCore

    model = PatchCore(PatchCoreConfig(coreset_ratio=ratio, holdout_fraction=holdout), device=device)
    rss_model = _hwm_mb()
    load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    images = _images(n, size, upscale)
    rss_images = _hwm_mb()
    stats = model.fit(images)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    keys = ("train_images", "holdout_images", "patch_features", "bank_size", "feature_dim", "feature_store_mb",
            "extract_seconds", "coreset_seconds", "index_seconds", "calibrate_seconds")
    return {"images": n, "image_side": size * upscale, "ratio": ratio, "holdout_fraction": holdout, "device": stats["device"],
            **{k: stats.get(k) for k in keys}, "fit_wall_s": round(wall, 1), "fit_cpu_s": round(cpu, 1),
            "peak_rss_mb": round(_rss_mb(), 1), "peak_vmhwm_mb": round(_hwm_mb(), 1),
            "rss_after_model_load_mb": round(rss_model, 1), "rss_before_fit_mb": round(rss_images, 1),
            "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count()}


def check(n: int, ratio: float, size: int) -> dict:
    """Streamed fit vs the in-memory reference (all features in one array, same greedy, same seed)."""
    import faiss

    from common.engine import calibration
    from common.engine.config import PatchCoreConfig
    from common.engine.coreset import greedy_coreset
    from common.engine.patchcore import PatchCore

    cfg = PatchCoreConfig(coreset_ratio=ratio)
    model = PatchCore(cfg, device="cpu")
    images = _images(n, size)
    model.fit(images)
    streamed = model.index.bank
    bank_ids, _ = calibration.holdout_split(n, cfg.holdout_fraction, cfg.seed)
    feats, _ = model.extract([images[i] for i in bank_ids])
    t = time.perf_counter()
    selected = greedy_coreset(feats, ratio, cfg.projection_dim, cfg.seed)
    in_memory_s = time.perf_counter() - t
    reference = feats[selected]

    def radius(bank: np.ndarray) -> float:
        d2, _ = faiss.knn(feats, bank, 1)
        return float(np.sqrt(max(float(d2.max()), 0.0)))

    return {"check": True, "images": n, "ratio": ratio, "patch_features": len(feats), "bank_size": len(reference),
            "identical_bank": bool(np.array_equal(streamed, reference)),
            "covering_radius_streamed": radius(streamed), "covering_radius_in_memory": radius(reference),
            "in_memory_coreset_s": round(in_memory_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 3000])
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--image-side", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--upscale", type=int, default=1, help="PNG files of the images enlarged this many times")
    p.add_argument("--check", type=int, metavar="N", help="compare streamed and in-memory fits on N images")
    p.add_argument("--one", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--check-one", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--repo", type=Path, default=REPO, help="run the fits with the code of this checkout "
                   "(e.g. an older one, for comparison)")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/fit_memory.jsonl")
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.ratio, a.image_side, a.device, a.holdout_fraction, a.upscale)), flush=True)
        return
    if a.check_one is not None:
        print(json.dumps(check(a.check_one, a.ratio, a.image_side)), flush=True)
        return
    common = ["--ratio", str(a.ratio), "--image-side", str(a.image_side), "--device", a.device,
              "--holdout-fraction", str(a.holdout_fraction), "--upscale", str(a.upscale),
              "--repo", str(a.repo.resolve())]
    runs = [[sys.executable, __file__, "--check-one", str(a.check), *common]] if a.check is not None else []
    runs += [[sys.executable, __file__, "--one", str(n), *common] for n in a.sizes]
    lines = []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for cmd in runs:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=a.repo).stdout
        lines.append(json.dumps({**json.loads(out.strip().splitlines()[-1]), "code": str(a.repo.resolve())}))
        record(lines[-1], a.out)


if __name__ == "__main__":
    if "--repo" in sys.argv:
        REPO = Path(sys.argv[sys.argv.index("--repo") + 1]).resolve()
    sys.path.insert(0, str(REPO))
    main()
