"""PatchCore on real data: MVTec AD bottle (in ../shared/datasets next to the repository)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.engine.config import PatchCoreConfig
from common.engine.evaluate import evaluate

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MVTEC = DATASETS / "mvtec_ad"


@pytest.mark.dataset
@pytest.mark.timeout(600)
def test_mvtec_bottle_image_auroc() -> None:
    if not (MVTEC / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {MVTEC}")
    report = evaluate(MVTEC, "bottle", PatchCoreConfig(coreset_ratio=0.01), progress=False)
    assert report["failed_images"] == []
    assert report["test_images"] == 83
    assert report["train_images"] + report["holdout_images"] == 209
    assert report["image_auroc"] >= 0.97, report["image_auroc"]
    # localisation works too (the paper reports ~0.98 pixel AUROC on bottle)
    assert report["pixel_auroc"] >= 0.9, report["pixel_auroc"]
    assert math.isfinite(report["aupro"]) and report["aupro"] > 0.5
