"""Verdicts and masks on real data under three threshold rules: the nominal rule (held-out training
images, no labels), F1-optimal thresholds from labelled validation images (a product's `--validation`),
and the image threshold at a false-alarm budget on their nominal images (`--max-false-alarms`, 5 % here).

    python bench/threshold_rules.py --data ../shared/datasets/mvtec_ad --category bottle
    python bench/threshold_rules.py --data ../shared/datasets/mtd --category magnetic_tile

Fits the default model on `train/good` once, then splits the test images in two halves, stratified by
defect type (seeded): the labelled thresholds are set on one half (`PatchCore.calibrate_with_labels`,
masks included; the budget counts that half's good images and the fit's held-out ones) and every rule
is judged on the other half, which none has seen. Then the halves swap. One JSON line per fold and rule: image recall, false-positive rate, precision and F1 of the
verdicts; pixel precision, recall and F1 of the masks (over every pixel of the judged half).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import mvtec  # noqa: E402
from common.engine.patchcore import ImageResult, PatchCore  # noqa: E402


def halves(tests: list[mvtec.TestImage], seed: int) -> tuple[list[int], list[int]]:
    """Two halves of the test images, each defect type (and good) split evenly, at random."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for kind in sorted({t.defect_type for t in tests}):
        ids = rng.permutation([i for i, t in enumerate(tests) if t.defect_type == kind]).tolist()
        first += ids[: len(ids) // 2]
        second += ids[len(ids) // 2:]
    return sorted(first), sorted(second)


def judge(results: list[ImageResult], tests: list[mvtec.TestImage], image_thr: float,
          pixel_thr: float) -> dict[str, float]:
    """Verdict and mask quality of `results` at the given thresholds."""
    labels = np.array([t.label for t in tests])
    flagged = np.array([r.score > image_thr for r in results])
    tp, fp = int(np.sum(flagged & (labels == 1))), int(np.sum(flagged & (labels == 0)))
    fn = int(np.sum(~flagged & (labels == 1)))
    ptp = pfp = pfn = 0
    for r, t in zip(results, tests, strict=True):
        top, left, h, w = r.box
        truth = mvtec.load_mask(t, r.image_hw)[top: top + h, left: left + w]
        mask = r.anomaly_map > pixel_thr
        ptp += int(np.sum(mask & truth))
        pfp += int(np.sum(mask & ~truth))
        pfn += int(np.sum(~mask & truth))

    def ratio(a: int, b: int) -> float:
        return round(a / b, 4) if b else float("nan")

    return {"image_recall": ratio(tp, tp + fn), "image_false_positive_rate": ratio(fp, int(np.sum(labels == 0))),
            "image_precision": ratio(tp, tp + fp), "image_f1": ratio(2 * tp, 2 * tp + fp + fn),
            "pixel_precision": ratio(ptp, ptp + pfp), "pixel_recall": ratio(ptp, ptp + pfn),
            "pixel_f1": ratio(2 * ptp, 2 * ptp + pfp + pfn)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-false-alarms", type=float, default=0.05,
                   help="the budget of the third rule (a product's --max-false-alarms)")
    a = p.parse_args()
    model = PatchCore(device="cpu")
    model.fit(mvtec.train_images(a.data, a.category))
    nominal = (model.image_threshold, model.pixel_threshold)
    tests = mvtec.test_images(a.data, a.category)
    results = model.predict([t.path for t in tests])
    for fold, (calibrate_ids, judge_ids) in enumerate([halves(tests, a.seed), halves(tests, a.seed)[::-1]]):
        masks = []
        for i in calibrate_ids:
            t = tests[i]
            masks.append(mvtec.load_mask(t, results[i].image_hw) if t.mask_path is not None else None)
        images, labels = [tests[i].path for i in calibrate_ids], [tests[i].label for i in calibrate_ids]
        f1 = model.calibrate_with_labels(images, masks, labels)
        budget = model.calibrate_with_labels(images, masks, labels, a.max_false_alarms)
        judged = [results[i] for i in judge_ids], [tests[i] for i in judge_ids]
        rules = [("nominal", nominal), ("f1_validation", f1), (f"false_alarms_{a.max_false_alarms:g}", budget)]
        for rule, (image_thr, pixel_thr) in rules:
            print(json.dumps({"category": a.category, "fold": fold, "rule": rule, "calibrated_on": len(calibrate_ids),
                              "judged": len(judge_ids), "image_threshold": round(image_thr, 3),
                              "pixel_threshold": round(pixel_thr, 3), **judge(*judged, image_thr, pixel_thr)}),
                  flush=True)


if __name__ == "__main__":
    main()
