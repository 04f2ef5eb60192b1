"""`totalrecall evaluate`: fit on DIR/NAME/train/good, score DIR/NAME/test/*, compare with ground truth.

The JSON keys image_auroc, pixel_auroc, aupro, fit_seconds, coreset_seconds, score_ms_per_image and
peak_rss_mb are the product's benchmark contract: keep them.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.engine import mvtec
from common.engine.config import PatchCoreConfig
from common.engine.metrics import PixelMetrics, f1_max, image_auroc
from common.engine.patchcore import PatchCore
from common.engine.roi import RegionOfInterest


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def evaluate(data: str | Path, category: str, config: PatchCoreConfig, shots: int | None = None,
             weights: str | None = None, device: str | None = "auto", progress: bool = True,
             roi: RegionOfInterest | None = None) -> dict[str, Any]:
    """Fit, score and measure (see the module docstring). With a region of interest, ground-truth defect
    pixels outside it count as missed: the metrics judge the inspection as configured."""
    train = mvtec.train_images(data, category)
    tests = mvtec.test_images(data, category)  # a missing or empty test folder fails before the fit
    if shots is not None:
        if not 1 <= shots <= len(train):
            raise ValueError(f"--shots must be between 1 and {len(train)}")
        picked = np.random.default_rng(config.seed).choice(len(train), shots, replace=False)
        train = [train[i] for i in sorted(picked)]
    model = PatchCore(config, device=device, weights=weights, roi=roi)
    fit = model.fit(train, progress=progress)

    pixels = PixelMetrics()
    scores, labels, types, failures = [], [], [], []
    # Scoring time covers decode to mask; time spent on the metrics below is excluded.
    metric_seconds = 0.0
    t0 = time.perf_counter()
    for pos, r in model.iter_predict([t.path for t in tests], progress=progress):
        t_metric = time.perf_counter()
        item = tests[pos]
        if not r.ok:
            failures.append({"image": str(item.path), "error": r.error})
            continue
        scores.append(r.score)
        labels.append(item.label)
        types.append(item.defect_type)
        top, left, h, w = r.box
        pixels.update(r.anomaly_map, mvtec.load_mask(item, r.image_hw)[top: top + h, left: left + w],
                      item.defect_type if item.label else None)  # per type: the defect types only
        metric_seconds += time.perf_counter() - t_metric
    score_seconds = time.perf_counter() - t0 - metric_seconds
    if not scores:
        raise ValueError(f"none of the {len(tests)} test images could be scored, e.g. {failures[0]['image']}: "
                         f"{failures[0]['error']}")
    image_f1, _ = f1_max(np.array(scores), np.array(labels))
    pixel_f1, _ = pixels.pixel_f1_max()
    predicted = np.array(scores) > model.image_threshold  # the verdict rule of `ImageResult.is_anomalous`
    calibrated = fit["holdout_images"] > 0  # in-sample thresholds say nothing of recall or false alarms
    return {
        "category": category,
        "data": str(data),
        "config": model.config.to_dict(),  # resize="auto" as fit resolved it
        "shots": shots,
        "train_images": fit["train_images"],
        "holdout_images": fit["holdout_images"],
        "test_images": len(tests),
        "failed_images": failures,  # test images
        "failed_training_images": [{"image": str(train[f["position"]]), "error": f["error"]}
                                   for f in fit["failed_images"]],
        "image_auroc": image_auroc(np.array(scores), np.array(labels)),
        "pixel_auroc": pixels.pixel_auroc(),
        "image_auroc_per_type": _per_type_auroc(np.array(scores), np.array(types)),
        "pixel_auroc_per_type": pixels.pixel_auroc_by_group(),
        "aupro": pixels.aupro(0.3),
        "image_f1_max": image_f1,
        "pixel_f1_max": pixel_f1,
        "image_threshold": model.image_threshold,
        "pixel_threshold": model.pixel_threshold,
        "calibration": fit["calibration"],
        "calibrated_recall": _share(predicted[np.array(labels) == 1]) if calibrated else float("nan"),
        "calibrated_false_positive_rate": _share(predicted[np.array(labels) == 0]) if calibrated else float("nan"),
        "patch_features": fit["patch_features"],
        "bank_size": fit["bank_size"],
        "feature_dim": fit["feature_dim"],
        "fit_seconds": fit["fit_seconds"],
        "extract_seconds": fit["extract_seconds"],
        "coreset_seconds": fit["coreset_seconds"],
        "index": fit["index"],
        "index_seconds": fit["index_seconds"],
        "calibrate_seconds": fit["calibrate_seconds"],
        "score_seconds": round(score_seconds, 3),
        "score_ms_per_image": round(1000.0 * score_seconds / max(1, len(tests)), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(model.device),
        "roi_fraction": fit.get("roi_fraction"),  # of each image inspected; None: the whole image
    }


def _share(flags: np.ndarray) -> float:
    """The fraction of True (NaN, written as null, when there are none to count)."""
    return float(flags.mean()) if flags.size else float("nan")


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None: a metric that is undefined for the data (no
    defective or no good test images) is written as JSON null, and the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _per_type_auroc(scores: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against the nominal test images."""
    good = scores[types == "good"]
    return {t: image_auroc(np.concatenate([good, scores[types == t]]),
                           np.r_[np.zeros(len(good)), np.ones(int((types == t).sum()))])
            for t in sorted(set(types) - {"good"})}


def format_table(report: dict[str, Any]) -> str:
    rows = [
        ("category", report["category"]),
        ("train / holdout / test images",
         f"{report['train_images']} / {report['holdout_images']} / {report['test_images']}"),
        ("image AUROC", f"{report['image_auroc']:.4f}"),
        ("pixel AUROC", f"{report['pixel_auroc']:.4f}"),
        ("AUPRO@0.3", f"{report['aupro']:.4f}"),
        ("image / pixel F1-max", f"{report['image_f1_max']:.4f} / {report['pixel_f1_max']:.4f}"),
        ("recall / FPR at calibrated threshold",
         f"{report['calibrated_recall']:.3f} / {report['calibrated_false_positive_rate']:.3f}"
         if report["holdout_images"] else "n/a: thresholds in-sample (no held-out image)"),
        ("patch features -> bank", f"{report['patch_features']} -> {report['bank_size']} x {report['feature_dim']}"),
        ("fit s (coreset s)", f"{report['fit_seconds']:.1f} ({report['coreset_seconds']:.1f})"),
        ("score ms/image", f"{report['score_ms_per_image']:.1f}"),
        ("peak RSS MB", f"{report['peak_rss_mb']:.0f}"),
        ("failed images (training / test)",
         f"{len(report['failed_training_images'])} / {len(report['failed_images'])}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
