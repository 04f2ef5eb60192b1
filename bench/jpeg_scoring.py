"""Scoring large JPEG photos: decode cost with and without reduced-scale decoding, and whole predict.

    python bench/jpeg_scoring.py                          # 24 photos of 2592 x 1944 (5 MP), quality 90
    python bench/jpeg_scoring.py --width 900 --height 900

Photos are generated parts (`common.synthetic`, upscaled, with sensor-like noise) encoded as JPEG. The
model's bank is a random subset of the patch features of a few of them (scoring cost depends on the
bank's size, not on how its rows were chosen). Reports per image: the full decode, the decode at the
scale the model's input needs (`decode_image(..., at_least=...)`), and `PatchCore.predict` on the JPEG
bytes (decode to mask), best of `--repeat`, wall and CPU milliseconds. Run it on two commits to compare
the whole path before and after a change.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np
from benchlib import best_of, record

REPO = Path(__file__).resolve().parents[1]


def photos(n: int, width: int, height: int, quality: int) -> list[bytes]:
    from PIL import Image

    from common.synthetic import encoded_parts

    rng = np.random.default_rng(0)
    out = []
    for data in encoded_parts(n, 256, seed=20_000):
        big = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
        noisy = np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def ms_per_item(fn, repeat: int, n: int) -> tuple[float, float]:
    """Best-of-`repeat` (wall, cpu) milliseconds per item of fn()."""
    wall, cpu = best_of(fn, repeat)
    return round(1000 * wall / n, 1), round(1000 * cpu / n, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--width", type=int, default=2592)
    p.add_argument("--height", type=int, default=1944)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--bank", type=int, default=2436)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench/out/jpeg_scoring.jsonl")
    a = p.parse_args()
    from common.engine.config import PatchCoreConfig
    from common.engine.patchcore import PatchCore
    from common.engine.preprocessing import resized_hw
    from common.images import decode_image

    data = photos(a.images, a.width, a.height, a.quality)
    model = PatchCore(PatchCoreConfig(), device="cpu")
    feats, _ = model.extract(data[:4])
    rng = np.random.default_rng(0)
    model.set_bank(feats[rng.choice(len(feats), min(a.bank, len(feats)), replace=False)])
    model.image_threshold = model.pixel_threshold = 1.0
    need = resized_hw(a.height, a.width, model.config)
    reduced = decode_image(data[0], at_least=need).shape[:2]
    model.predict(data[:8])  # warm-up
    row = {"image_hw": [a.height, a.width], "jpeg_kb": round(np.mean([len(d) for d in data]) / 1024, 1),
           "input_hw": list(need), "reduced_decode_hw": list(reduced), "bank": len(model.index),
           "decode_full_ms": ms_per_item(lambda: [decode_image(d) for d in data], a.repeat, len(data)),
           "decode_reduced_ms": ms_per_item(lambda: [decode_image(d, at_least=need) for d in data], a.repeat, len(data)),
           "predict_ms": ms_per_item(lambda: model.predict(data), a.repeat, len(data)),
           "loadavg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    record(row, a.out)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
