"""GPU check: fit and score on CUDA, compare with the CPU path, print images/second.

    python bench/gpu_check.py                     # about 2-4 minutes on one GPU
    python bench/gpu_check.py --train 100 --test 32 --cpu-images 16   # quicker
    python bench/gpu_check.py --precision bf16        # bfloat16 backbone on both devices (looser --score-tol)

Without a CUDA GPU it prints why and exits with status 0 (nothing to check); `--require-gpu` makes that
status 1. On the GPU it runs, on generated 256 x 256 parts (`common.synthetic`, a quarter of the test
images with a planted defect):
1. fit on CUDA: float32 (bf16 autocast with `--precision bf16`) channels-last backbone, the projection
   and the dense greedy coreset on the GPU; search by a faiss GPU index when `faiss.get_num_gpus() > 0`,
   else by torch on the GPU (`knn.TorchFlatL2`, a faiss-cpu install): a search on the CPU fails the check;
2. coreset: the GPU dense loop and the CPU pruned loop on the same features select the same greedy
   sequence (covering radii equal within --radius-tol; float rounding may reorder near-ties);
3. scores: the GPU-fitted model saved, loaded on the CPU (the same precision, CPU faiss) and both score
   the same PNG bytes: image scores agree within --score-tol (relative; default 0.005 in float32, 0.1 in
   bfloat16, whose kernels round differently on the two devices), anomaly-map maxima too, and every
   verdict but near-threshold ones is the same;
4. images/second: GPU predict on PNG bytes, GPU bare backbone (same batch and input size), CPU predict.
Exit status 1 if a check fails. One JSON line goes to --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from benchlib import record

REPO = Path(__file__).resolve().parents[1]


def _rate(fn, n: int, sync) -> float:
    fn()  # warm-up
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return n / (time.perf_counter() - t)


def main() -> int:
    from common.engine.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--test", type=int, default=96)
    p.add_argument("--cpu-images", type=int, default=32, help="images scored on the CPU for its rate")
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--coreset-check-rows", type=int, default=100_000)
    p.add_argument("--score-tol", type=float, help="relative (default 0.005; 0.1 with --precision bf16)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="PatchCoreConfig.precision of the model (auto and fp32: float32)")
    p.add_argument("--radius-tol", type=float, default=1e-3, help="relative")
    p.add_argument("--require-gpu", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: dry run of this script's logic without a GPU")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/gpu_check.jsonl")
    a = p.parse_args()
    if a.score_tol is None:
        a.score_tol = 0.1 if a.precision == "bf16" else 0.005

    import faiss
    import torch

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
              f"torch.cuda.is_available() is False): nothing checked.")
        return 1 if a.require_gpu else 0

    from common.engine.config import PatchCoreConfig
    from common.engine.coreset import covering_radius, greedy_coreset
    from common.engine.patchcore import PatchCore
    from common.engine.preprocessing import resized_hw
    from common.synthetic import encoded_parts, nominal_image

    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    row: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else "none (dry run)", "torch": torch.__version__, "faiss": faiss.__version__,
                 "faiss_gpus": faiss_gpus, "train_images": a.train, "test_images": a.test, "precision": a.precision}
    failures: list[str] = []
    cfg = PatchCoreConfig(coreset_ratio=a.ratio, batch_size=a.batch_size, precision=a.precision)
    train = [partial(nominal_image, i, a.side) for i in range(a.train)]
    tests = encoded_parts(a.test, a.side, seed=50_000)

    # 1. fit on the GPU
    gpu = PatchCore(cfg, device=a.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stats = gpu.fit(train)
    row["fit"] = {k: stats[k] for k in ("patch_features", "bank_size", "extract_seconds", "coreset_seconds",
                                        "index_seconds", "calibrate_seconds", "fit_seconds", "device")}
    row["fit"]["search"] = type(gpu.index.index).__name__ if gpu.index.index is not None else "faiss.knn"
    row["fit"]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    if cuda and gpu.index.index is None:  # faiss.knn: the search would hold a GPU worker to its CPU's pace
        failures.append("the exact search of a model on CUDA runs on the CPU")

    # 2. coreset: GPU dense loop vs CPU pruned loop on the same features
    feats, _ = gpu.extract(train[: max(1, a.coreset_check_rows // 784)])
    feats = feats[: a.coreset_check_rows]
    t = time.perf_counter()
    sel_gpu = greedy_coreset(torch.from_numpy(feats).to(dev), a.ratio, cfg.projection_dim, cfg.seed)
    sync()
    gpu_s = time.perf_counter() - t
    t = time.perf_counter()
    sel_cpu = greedy_coreset(feats, a.ratio, cfg.projection_dim, cfg.seed)
    cpu_s = time.perf_counter() - t
    x = torch.from_numpy(feats).to(dev)
    r_gpu, r_cpu = covering_radius(x, sel_gpu), covering_radius(x, sel_cpu)
    agree = int(np.argmax(sel_gpu != sel_cpu)) if not np.array_equal(sel_gpu, sel_cpu) else len(sel_gpu)
    row["coreset"] = {"rows": len(feats), "selected": len(sel_gpu), "gpu_s": round(gpu_s, 2), "cpu_s": round(cpu_s, 2),
                      "same_prefix": agree, "radius_gpu": r_gpu, "radius_cpu": r_cpu}
    if abs(r_gpu - r_cpu) > a.radius_tol * r_cpu:
        failures.append(f"coreset covering radius GPU {r_gpu:.4f} vs CPU {r_cpu:.4f}")

    # 3. the same artifact scored on the GPU and on the CPU
    with tempfile.TemporaryDirectory() as folder:
        sha = gpu.save(folder)
        cpu = PatchCore.load(folder, sha, device="cpu")
    res_gpu, res_cpu = gpu.predict(tests), cpu.predict(tests)
    s_gpu = np.array([r.score for r in res_gpu])
    s_cpu = np.array([r.score for r in res_cpu])
    m_gpu = np.array([r.anomaly_map.max() for r in res_gpu])
    m_cpu = np.array([r.anomaly_map.max() for r in res_cpu])
    rel = float(np.max(np.abs(s_gpu - s_cpu) / np.abs(s_cpu)))
    rel_map = float(np.max(np.abs(m_gpu - m_cpu) / np.abs(m_cpu)))
    thr = gpu.image_threshold
    near = np.abs(s_cpu - thr) <= a.score_tol * thr
    differ = (s_gpu > thr) != (s_cpu > thr)
    row["scores"] = {"max_rel_diff": rel, "max_rel_diff_map_max": rel_map,
                     "verdicts_differ": int(differ.sum()), "verdicts_differ_not_near_threshold": int((differ & ~near).sum()),
                     "rank_corr": float(np.corrcoef(np.argsort(np.argsort(s_gpu)), np.argsort(np.argsort(s_cpu)))[0, 1])}
    if rel > a.score_tol or rel_map > a.score_tol or (differ & ~near).any():
        failures.append(f"scores GPU vs CPU: max relative difference {rel:.4f} (maps {rel_map:.4f}), "
                        f"{int((differ & ~near).sum())} verdicts differ away from the threshold")

    # 4. images/second
    input_hw = resized_hw(a.side, a.side, cfg)
    xb = torch.randn(a.batch_size, 3, *input_hw, device=dev).contiguous(memory_format=torch.channels_last)
    batches = max(1, a.test // a.batch_size)

    def backbone() -> None:
        with torch.inference_mode(), gpu.autocast():
            for _ in range(batches):
                gpu.features.extractor(xb)

    row["rates"] = {"gpu_predict_ips": round(_rate(lambda: gpu.predict(tests), len(tests), sync), 1),
                    "gpu_backbone_ips": round(_rate(backbone, batches * a.batch_size, sync), 1),
                    "cpu_predict_ips": round(_rate(lambda: cpu.predict(tests[: a.cpu_images]), a.cpu_images,
                                                   lambda: None), 2)}
    row["rates"]["gpu_ratio_predict_to_backbone"] = round(row["rates"]["gpu_predict_ips"]
                                                          / row["rates"]["gpu_backbone_ips"], 3)
    row["failures"] = failures
    record(row, a.out)
    print("gpu_check: " + ("OK" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
