"""Images/second of the whole score path against the bare backbone, on the CPU (or --device cuda).

    python bench/score_throughput.py                              # exact index, 14.1k-row bank
    python bench/score_throughput.py --index ivf_flat --profile   # IVF index; where the time goes

Whole path: `PatchCore.predict` on encoded PNG bytes (decode -> preprocess -> backbone -> patch features
-> kNN -> Eq. 7 -> smoothed maps -> masks). Backbone: the `StageExtractor` alone on pre-made input
tensors of the same batch size and input size (channels-last, inference mode). Images are generated
256 x 256 parts (`common.synthetic`), a quarter with a planted defect. The bank is a random subset of
the patch features of `--train` generated images, of `--bank` rows (default: the size of a 10 %
coreset of 200 images); scoring cost depends on the bank's size, not on how its rows were chosen.
`--profile` times each stage of the path separately (same batches, sequentially, no decode threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from benchlib import HostShares, best_of, record

REPO = Path(__file__).resolve().parents[1]


def build_model(a: argparse.Namespace):
    from common.engine.config import PatchCoreConfig
    from common.engine.patchcore import PatchCore
    from common.synthetic import nominal_image

    cfg = PatchCoreConfig(batch_size=a.batch_size, index=a.index, index_min_bank=0, index_nprobe=a.nprobe,
                          precision=a.precision)
    model = PatchCore(cfg, device=a.device)
    feats, _ = model.extract([partial(nominal_image, i, a.side) for i in range(a.train)])
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    model.set_bank(feats[rng.choice(len(feats), min(a.bank, len(feats)), replace=False)])
    index_s = time.perf_counter() - t
    model.image_threshold = model.pixel_threshold = 1.0
    return model, index_s


def rates(model, images: list[bytes], input_hw: tuple[int, int], repeat: int) -> dict:
    """Best-of-`repeat` images/second of predict, the bare backbone and backbone + patch features,
    measured in turns (so a change of machine load affects all three alike)."""
    batch = model.config.batch_size
    batches = max(1, len(images) // batch)
    x = torch.randn(batch, 3, *input_hw).to(model.device).contiguous(memory_format=torch.channels_last)
    extractor = model.features.extractor

    def loop(fn: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(batches):
                    fn(x)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
        return run

    def backbone(t: torch.Tensor) -> object:
        with model.autocast():
            return extractor(t)

    runs = {"predict": (lambda: model.predict(images), len(images)),
            "backbone": (loop(backbone), batch * batches), "features": (loop(model.embed), batch * batches)}
    for fn, _ in runs.values():  # warm-up
        fn()
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeat):
        for name, (fn, _) in runs.items():
            best[name] = min(best[name], best_of(fn, 1))
    out = {}
    for name, (_, n) in runs.items():
        out[f"{name}_ips"] = round(n / best[name][0], 2)
        out[f"{name}_cpu_ms_per_image"] = round(1000 * best[name][1] / n, 1)
    out["ratio_predict_to_backbone"] = round(out["predict_ips"] / out["backbone_ips"], 3)
    return out


def profile(model, images: list[bytes]) -> dict:
    """Milliseconds per image of each stage of `PatchCore._score_batch`, run one after the other on the
    same batches (decoding on this thread: predict overlaps it with the model on loader threads)."""
    from common.engine.loader import load_rgb
    from common.engine.maps import anomaly_map
    from common.engine.preprocessing import to_input
    from common.engine.scoring import image_scores

    cfg = model.config
    parts = dict.fromkeys(("decode", "preprocess", "backbone+features", "knn", "eq7", "maps", "masks"), 0.0)
    for start in range(0, len(images), cfg.batch_size):
        chunk = images[start: start + cfg.batch_size]
        t = [time.perf_counter()]
        rgb = [load_rgb(b, cfg) for b in chunk]
        t.append(time.perf_counter())
        inputs = [to_input(im, cfg, model.mean, model.std, full_hw) for im, full_hw in rgb]
        x = torch.stack([i for i, _ in inputs])
        t.append(time.perf_counter())
        feats = model.embed(x)
        b, h, w, d = feats.shape
        flat = feats.reshape(-1, d).cpu().numpy()
        t.append(time.perf_counter())
        dist, ids = model.index.search(flat, 1)
        dist, ids = dist.reshape(b, h * w), ids.reshape(b, h * w)
        t.append(time.perf_counter())
        image_scores(flat.reshape(b, h * w, d), dist, ids, model.index, cfg.num_neighbors)
        t.append(time.perf_counter())
        maps = [anomaly_map(dist[i].reshape(h, w), tuple(x.shape[-2:]), geo.box[2:], cfg.sigma, model.features.stride)
                for i, (_, geo) in enumerate(inputs)]
        t.append(time.perf_counter())
        for amap in maps:
            mask = amap > model.pixel_threshold
            np.unravel_index(int(np.argmax(amap)), amap.shape)
            float(mask.mean())
        t.append(time.perf_counter())
        for key, t0, t1 in zip(parts, t, t[1:], strict=False):
            parts[key] += t1 - t0
    total = sum(parts.values())
    return {"ms_per_image": {k: round(1000 * v / len(images), 2) for k, v in parts.items()},
            "share": {k: round(v / total, 3) for k, v in parts.items()}}


def main() -> None:
    from common.engine.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="backbone arithmetic (PatchCoreConfig.precision), for both figures")
    p.add_argument("--index", default="flat", choices=["flat", "ivf_flat", "ivf_pq"])
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query")
    p.add_argument("--bank", type=int, default=14_112)
    p.add_argument("--train", type=int, default=200, help="generated images whose features make the bank")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: their default)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/score_throughput.jsonl")
    a = p.parse_args()
    if a.threads:
        import faiss

        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    from common.engine.preprocessing import resized_hw
    from common.synthetic import encoded_parts

    load0, host = os.getloadavg()[0], HostShares()
    model, index_s = build_model(a)
    images = encoded_parts(a.images, a.side, seed=10_000)
    results = model.predict(images)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    input_hw = resized_hw(a.side, a.side, model.config)
    row = {"device": str(model.device), "precision": a.precision, "index": model.index.spec.to_dict(), "bank": len(model.index),
           "images": a.images, "image_side": a.side, "input_hw": list(input_hw), "batch_size": a.batch_size,
           "torch_threads": torch.get_num_threads(), "index_build_s": round(index_s, 2),
           **rates(model, images, input_hw, a.repeat),
           "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
           **host.shares()}
    if a.profile:
        row["profile"] = profile(model, images)
    record(row, a.out)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
