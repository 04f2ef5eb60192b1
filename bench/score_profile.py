"""Where scoring time goes: cProfile of `PatchCore.predict` on MVTec bottle test images.

    python bench/score_profile.py [--data ../shared/datasets/mvtec_ad] [--images 40]

Builds a random `--bank`-row bank from 100 training images (default 2,436 rows, the size of the default
1 % coreset on bottle; 14,739 for the old 224 px / 10 % default) to skip the coreset, then profiles scoring of pre-decoded images and reports per-image times
of decoding, the whole predict, and its main parts.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import numpy as np

from common.engine import mvtec
from common.engine.patchcore import PatchCore
from common.images import decode_image

PARTS = {
    "knn (faiss exact search)": "knn_L2sqr",
    "backbone convolutions": "torch.conv2d",
    "backbone same-padding": "torch._C._nn.pad",
    "map upsampling": "upsample_bilinear2d",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/datasets/mvtec_ad")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--bank", type=int, default=2436, help="rows of the random bank")
    a = p.parse_args()
    model = PatchCore()
    feats, _ = model.extract(mvtec.train_images(a.data, "bottle")[:100])
    rng = np.random.default_rng(0)
    model.set_bank(feats[rng.choice(len(feats), a.bank, replace=False)])
    model.image_threshold = model.pixel_threshold = 1.0
    paths = [t.path for t in mvtec.test_images(a.data, "bottle")][: a.images]
    t = time.perf_counter()
    images = [decode_image(path) for path in paths]
    decode_ms = (time.perf_counter() - t) / len(paths) * 1000
    model.predict(images[:8])  # warm-up
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.runcall(model.predict, images)
    predict_ms = (time.perf_counter() - t) / len(images) * 1000
    stats = pstats.Stats(profiler).stats
    parts = {name: round(sum(v[2] for k, v in stats.items() if key in f"{k[0]}:{k[2]}") / len(images) * 1000, 2)
             for name, key in PARTS.items()}
    t = time.perf_counter()
    model.predict(paths)
    end_to_end_ms = (time.perf_counter() - t) / len(paths) * 1000
    print(json.dumps({"decode_ms": round(decode_ms, 2), "predict_decoded_ms": round(predict_ms, 2),
                      "predict_from_files_ms": round(end_to_end_ms, 2), "parts_ms": parts}))


if __name__ == "__main__":
    main()
