"""The image score's s*: the paper's single highest patch distance against the mean of the highest fraction
of them (`--image-score-top`), on real data, through the engine's own `image_scores` (Eq. 7 included).

    python bench/image_score_top.py --data ../shared/datasets/mvtec_ad --category bottle --plant
    python bench/image_score_top.py --data ../shared/datasets/mtd --category magnetic_tile

Fits the default model once; every fraction scores the same patch distances. One JSON line per fraction:
image AUROC, per defect type (its images against the good ones), the good images' score mean and
standard deviation, and the weakest defect's margin over them in those deviations. `--plant` also darkens
a disk of radius 3, 6, 10 and 16 px at a random place near the centre of each good test image (the
smallest defects a fraction could dilute) and reports, per radius, the AUROC against the good images
and how many score above the highest good one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import mvtec  # noqa: E402
from common.engine.metrics import image_auroc  # noqa: E402
from common.engine.patchcore import PatchCore  # noqa: E402
from common.engine.scoring import image_scores  # noqa: E402
from common.images import png_bytes  # noqa: E402
from common.synthetic import blob_mask  # noqa: E402

FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05)
RADII = (3, 6, 10, 16)


def scores_by_fraction(model: PatchCore, images: list, fractions=FRACTIONS) -> dict[float, np.ndarray]:
    """Image scores of `images` for each fraction, from one kNN search per batch."""
    out = {f: np.zeros(len(images)) for f in fractions}
    for batch in model._batches(images):
        feats, dist, ids, counted, _ = model.nearest(batch)
        for f in fractions:
            out[f][batch.positions] = image_scores(feats, dist, ids, model.index, model.config.num_neighbors, f,
                                                   counted)
    return out


def auroc_against(good: np.ndarray, bad: np.ndarray) -> float:
    return image_auroc(np.r_[good, bad], np.r_[np.zeros(len(good)), np.ones(len(bad))])


def planted(paths: list[Path], seed: int) -> tuple[list[bytes], np.ndarray]:
    """Each good image with a dark disk of each radius, as PNG bytes; and the radius of each."""
    rng = np.random.default_rng(seed)
    images, radii = [], []
    for r in RADII:
        for p in paths:
            a = np.array(Image.open(p).convert("RGB"))
            h, w = a.shape[:2]
            angle, off = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.28) * min(h, w)
            cy, cx = h / 2 + off * np.sin(angle), w / 2 + off * np.cos(angle)
            disk = blob_mask(h, w, (cy, cx), r)
            a[disk] = (a[disk] * 0.3).astype(np.uint8)
            images.append(png_bytes(a))
            radii.append(r)
    return images, np.array(radii)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--plant", action="store_true", help="also score tiny planted defects on the good images")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model = PatchCore(device="cpu")
    model.fit(mvtec.train_images(a.data, a.category))
    tests = mvtec.test_images(a.data, a.category)
    labels = np.array([t.label for t in tests])
    types = np.array([t.defect_type for t in tests])
    scores = scores_by_fraction(model, [t.path for t in tests])
    good_paths = [t.path for t in tests if t.label == 0]
    tiny = None
    if a.plant:
        images, radii = planted(good_paths, a.seed)
        tiny = (scores_by_fraction(model, images), radii)
    for f, s in scores.items():
        good, bad = s[labels == 0], s[labels == 1]
        row = {"category": a.category, "image_score_top": f, "image_auroc": round(image_auroc(s, labels), 4),
               "per_type": {str(t): round(auroc_against(good, s[types == t]), 4)
                            for t in sorted(set(types[labels == 1]))},
               "good_mean": round(float(good.mean()), 3), "good_std": round(float(good.std()), 3),
               "weakest_defect_margin_std": round(float((bad.min() - good.mean()) / good.std()), 2)}
        if tiny is not None:
            t_scores, radii = tiny[0][f], tiny[1]
            row["planted"] = {str(r): {"auroc": round(auroc_against(good, t_scores[radii == r]), 4),
                                       "above_max_good": int((t_scores[radii == r] > good.max()).sum()),
                                       "images": int((radii == r).sum())} for r in RADII}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
