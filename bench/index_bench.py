"""Approximate (IVF) kNN index against the exact one: accuracy, speed and memory.

    python bench/index_bench.py accuracy --data ../shared/datasets/mvtec_ad/bottle   # AUROC per index
    python bench/index_bench.py scale --sizes 100000 1000000                          # speed, memory, recall

accuracy: `common.engine.evaluate.evaluate` on an MVTec category once per index ("flat", "ivf_flat",
"ivf_pq"; `index_min_bank=0` so the ~16k-row bottle bank gets the IVF index), each in a fresh process;
the fit and its coreset are the same, only the index differs.

scale: banks of M rows made of real patch features (the category's training features, tiled with small
Gaussian jitter to reach M), queried with the category's test-image features (Q rows). For each index:
build seconds (training + adding), search milliseconds per query (per image: x784 at the default input),
recall@1 against exact search, host memory (`NearestNeighbors.nbytes` and the measured RSS growth), and
the bytes the artifact stores for the index. Memory per million features = bytes / M * 1e6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import record

REPO = Path(__file__).resolve().parents[1]
KINDS = ("flat", "ivf_flat", "ivf_pq")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def accuracy_one(data: Path, kind: str, nprobe: int) -> dict:
    from common.engine.config import PatchCoreConfig
    from common.engine.evaluate import evaluate

    cfg = PatchCoreConfig(index=kind, index_min_bank=0, index_nprobe=nprobe)
    r = evaluate(data.parent, data.name, cfg, progress=False)
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "bank_size", "fit_seconds",
            "coreset_seconds", "score_ms_per_image", "peak_rss_mb", "calibrated_recall",
            "calibrated_false_positive_rate", "image_threshold", "pixel_threshold")
    return {"category": data.name, "index": kind, "nprobe": nprobe, **{k: r[k] for k in keys},
            "loadavg": round(os.getloadavg()[0], 2)}


def _features(data: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(training features, test features) of the category, extracted once and cached as .npy."""
    train_f, test_f = cache / f"{data.name}_train.npy", cache / f"{data.name}_test.npy"
    if not (train_f.exists() and test_f.exists()):
        from common.engine import mvtec
        from common.engine.patchcore import PatchCore

        model = PatchCore(device="cpu")
        cache.mkdir(parents=True, exist_ok=True)
        np.save(train_f, model.extract(mvtec.train_images(data.parent, data.name))[0])
        np.save(test_f, model.extract([t.path for t in mvtec.test_images(data.parent, data.name)])[0])
    return np.load(train_f, mmap_mode="r"), np.load(test_f)


def scale_one(data: Path, cache: Path, m: int, queries: int, nprobe: int, kinds: list[str]) -> list[dict]:
    import faiss

    from common.engine.config import PatchCoreConfig
    from common.engine.knn import IndexSpec, NearestNeighbors

    base, test = _features(data, cache)
    rng = np.random.default_rng(0)
    bank = np.asarray(base[np.sort(rng.integers(0, len(base), m))], dtype=np.float32)
    bank += rng.normal(0, 0.05 * float(np.std(base[:10_000])), size=bank.shape).astype(np.float32)
    q = np.ascontiguousarray(test[rng.choice(len(test), min(queries, len(test)), replace=False)])
    rows, exact_ids = [], None
    for kind in kinds:
        spec = IndexSpec.for_bank(PatchCoreConfig(index=kind, index_min_bank=0, index_nprobe=nprobe), m, bank.shape[1])
        rss0 = _rss_mb()
        t, c = time.perf_counter(), time.process_time()
        nn = NearestNeighbors(bank, use_gpu=False, spec=spec)
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
        rss_growth = _rss_mb() - rss0
        nn.search(q[:1024], 1)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        _, ids = nn.search(q, 1)
        search_s, search_cpu = time.perf_counter() - t, time.process_time() - c
        if kind == "flat":
            exact_ids = ids[:, 0]
        stored = 0 if nn.state is None else nn.state.trained.nbytes + nn.state.lists.nbytes
        index_bytes = nn.nbytes - nn.bank.nbytes
        rows.append({
            "bank_rows": m, "queries": len(q), "index": kind, "spec": spec.to_dict(),
            "build_s": round(build_s, 2), "build_cpu_s": round(build_cpu, 2),
            "search_ms_per_query": round(1000 * search_s / len(q), 4),
            "search_cpu_ms_per_query": round(1000 * search_cpu / len(q), 4),
            "search_ms_per_image_784": round(784 * 1000 * search_s / len(q), 2),
            "recall_at_1": None if exact_ids is None else round(float((ids[:, 0] == exact_ids).mean()), 4),
            "host_mb": round(nn.nbytes / 2**20, 1), "index_mb_beyond_bank": round(index_bytes / 2**20, 1),
            "index_mb_per_million": round(index_bytes / m * 1e6 / 2**20, 1),
            "total_mb_per_million": round(nn.nbytes / m * 1e6 / 2**20, 1),
            "rss_growth_mb": round(rss_growth, 1), "artifact_index_mb": round(stored / 2**20, 2),
            "threads": faiss.omp_get_max_threads(), "loadavg": round(os.getloadavg()[0], 2)})
        del nn
    speed = {r["index"]: r["search_ms_per_query"] for r in rows}
    for r in rows:
        r["speedup_vs_flat"] = round(speed["flat"] / r["search_ms_per_query"], 2) if "flat" in speed else None
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["accuracy", "scale"])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/mvtec_ad/bottle")
    p.add_argument("--kinds", nargs="*", default=list(KINDS))
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=6272, help="scale: query rows (8 images of 784 patches)")
    p.add_argument("--cache", type=Path, default=REPO / "bench/out/features")
    p.add_argument("--one", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "bench/out/index_bench.jsonl")
    a = p.parse_args()
    if a.one is not None:
        rows = ([accuracy_one(a.data, a.one[0], a.nprobe)] if a.mode == "accuracy"
                else scale_one(a.data, a.cache, int(a.one[0]), a.queries, a.nprobe, a.kinds))
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    jobs = [[k] for k in a.kinds] if a.mode == "accuracy" else [[str(m)] for m in a.sizes]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        cmd = [sys.executable, __file__, a.mode, "--data", str(a.data), "--nprobe", str(a.nprobe), "--queries",
               str(a.queries), "--cache", str(a.cache), "--kinds", *a.kinds, "--one", *job]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        for line in out.strip().splitlines():
            if line.startswith("{"):
                record(line, a.out)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
