"""A worker's model cache: load time cold / disk-warm / memory-warm, and memory with many products.

    python bench/model_cache.py                                   # local-folder storage, 50 products
    python bench/model_cache.py --storage-url s3://bucket/bench   # S3 (AWS_ENDPOINT_URL for MinIO, moto)
    python bench/model_cache.py --bank 14112 --index ivf_flat     # products with an IVF index

Writes `--products` artifacts (a random bank of `--bank` rows each: the 10 % coreset of a 200-image
product is 14.1k rows; loading does not depend on how the rows were chosen) to the storage, then in
this process:
- cold: an empty `ModelCache` (memory and disk) gets each model: download + sha256 checks + load;
- disk-warm: a new `ModelCache` on the same cache folder (a restarted worker): verify + load;
- warm: the models still in memory (all of them if they fit in the bound) again;
and reports RSS after each phase, with the cache bounded by `--cache-mb` (TOTALRECALL_MODEL_CACHE_MB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import record

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _summary(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
            "first_ms": round(1000 * seconds[0], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", type=int, default=50)
    p.add_argument("--bank", type=int, default=14_112)
    p.add_argument("--index", default="flat", choices=["flat", "ivf_flat", "ivf_pq"])
    p.add_argument("--cache-mb", type=float, default=2048)
    p.add_argument("--storage-url", default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/model_cache.jsonl")
    a = p.parse_args()

    from common.engine.artifact import BANK_FILE, META_FILE
    from common.engine.config import PatchCoreConfig
    from common.engine.patchcore import PatchCore
    from common.storage import open_storage
    from workers.model_cache import ModelCache

    work = Path(tempfile.mkdtemp(prefix="totalrecall-cache-bench-"))
    try:
        store = open_storage(a.storage_url or work / "storage")
        cfg = PatchCoreConfig(index=a.index, index_min_bank=0)
        rss_start = _rss_mb()
        writer = PatchCore(cfg, device="cpu")
        t = time.perf_counter()
        models = []
        for i in range(a.products):
            writer.set_bank(np.random.default_rng(i).standard_normal((a.bank, writer.features.dim), np.float32))
            writer.image_threshold = writer.pixel_threshold = 1.0
            sha = writer.save(work / "out")
            for name in (BANK_FILE, META_FILE):
                store.put_file(f"models/p{i:03d}/{name}", work / "out" / name)
            models.append((sha, store.uri_for(f"models/p{i:03d}")))
        write_s = time.perf_counter() - t
        artifact_mb = sum(f.stat().st_size for f in (work / "out").iterdir()) / 2**20
        bank_mb = writer.index.nbytes / 2**20
        del writer

        rss_before = _rss_mb()
        cache = ModelCache(work / "cache", int(a.cache_mb * 2**20), device="cpu")
        phases = {}
        for phase in ("cold", "warm"):
            in_memory = set(cache.cached())
            times = []
            for sha, uri in models if phase == "cold" else [m for m in models if m[0] in in_memory]:
                t = time.perf_counter()
                cache.get(sha, uri)
                times.append(time.perf_counter() - t)
            phases[phase] = {**_summary(times), "models": len(times), "rss_mb": round(_rss_mb(), 1)}
        stats_after_warm = vars(cache.stats).copy()
        cache.clear()
        cache = ModelCache(work / "cache", int(a.cache_mb * 2**20), device="cpu")  # a restarted worker
        times = []
        for sha, uri in models:
            t = time.perf_counter()
            cache.get(sha, uri)
            times.append(time.perf_counter() - t)
        phases["disk_warm"] = {**_summary(times), "models": len(times), "rss_mb": round(_rss_mb(), 1)}
        row = {"products": a.products, "bank_rows": a.bank, "index": a.index, "model_mb": round(bank_mb, 2),
               "artifact_mb": round(artifact_mb, 2), "cache_mb": a.cache_mb,
               "storage": "s3" if str(a.storage_url or "").startswith("s3://") else "local folder",
               "write_all_s": round(write_s, 1), **phases, "cache_stats_after_warm": stats_after_warm,
               "models_in_memory": len(cache.cached()), "cache_bytes_used_mb": round(cache.bytes_used / 2**20, 1),
               "rss_start_mb": round(rss_start, 1), "rss_before_cache_mb": round(rss_before, 1),
               "loadavg": round(os.getloadavg()[0], 2)}
        record(row, a.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
