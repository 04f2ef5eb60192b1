"""Score-drift levels (`common.drift`) of a category's defect-free test images, as they are and as a
changed camera would photograph them: would a night of good parts raise the warning?

    python bench/drift_levels.py --data ../shared/datasets/mvtec_ad --category bottle
    python bench/drift_levels.py --data ../shared/datasets/mtd --category magnetic_tile

Fits the default model on `train/good`, then scores `test/good` (a "night" of good parts) as is and
after each change below; prints one JSON line: per variant the drift level of the night's median score
(against the median of the fit's held-out images and the image threshold) and how many images were
flagged. The level of an unchanged night is also bootstrapped (2,000 nights drawn with replacement) for
its 95th percentile, the false-alarm margin of the default warning level 0.5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.drift import drift_level  # noqa: E402
from common.engine import mvtec  # noqa: E402
from common.engine.loader import load_rgb  # noqa: E402
from common.engine.patchcore import PatchCore  # noqa: E402

CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "unchanged": lambda a: a,
    "brightness x0.9": lambda a: (a * 0.9).astype(np.uint8),
    "brightness x0.7": lambda a: (a * 0.7).astype(np.uint8),
    "defocus (Gaussian blur, sigma 2 px)": lambda a: ndimage.gaussian_filter(a, (2, 2, 0)),
    "camera shifted by 3 % of the width": lambda a: np.roll(a, a.shape[1] // 33, axis=1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    a = p.parse_args()
    model = PatchCore(device="cpu")
    model.fit(mvtec.train_images(a.data, a.category))
    nominal = statistics.median(model.stats["holdout_scores"])
    threshold = model.image_threshold
    good = [load_rgb(t.path)[0] for t in mvtec.test_images(a.data, a.category) if t.label == 0]
    out: dict = {"category": a.category, "holdout_images": len(model.stats["holdout_scores"]),
                 "nominal_median": round(nominal, 3), "image_threshold": round(threshold, 3), "night": len(good)}
    for name, change in CHANGES.items():
        scores = [r.score for r in model.predict([change(image) for image in good])]
        level = drift_level(statistics.median(scores), nominal, threshold)
        out[name] = {"level": round(level, 3), "flagged": sum(s > threshold for s in scores)}
        if name == "unchanged":
            rng = np.random.default_rng(0)
            nights = [drift_level(float(np.median(rng.choice(scores, len(scores)))), nominal, threshold)
                      for _ in range(2000)]
            out[name]["level_p95_bootstrap"] = round(float(np.percentile(nights, 95)), 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
