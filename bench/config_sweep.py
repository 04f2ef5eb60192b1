"""Accuracy of PatchCore settings on an MVTec-layout category: fit once per setting, then pixel metrics
for several smoothing sigmas from the same patch scores (the sweep behind docs/benchmarks.md section 2).

    python bench/config_sweep.py --data ../shared/datasets/mvtec_ad --category bottle \\
        --config '{"image_size": 288, "coreset_ratio": 0.01}' --config '{"image_size": 224}' --sigmas 2 4
    python bench/config_sweep.py ... --reference-aggregation     # the reference code's patch features

Each `--config` is a JSON object of `PatchCoreConfig` fields over the defaults. One JSON line per config
on stdout: image AUROC, and (pixel AUROC, AUPRO@0.3, per-defect-type pixel AUROC with each type's share of the
defect pixels) per sigma. Times are wall seconds of this process
(no metric work in `score_s`). `--reference-aggregation` replaces the 3x3 average of each stage by what
patchcore-inspection does: the 3x3 neighbourhood flattened (C x 3 x 3) and pooled to 1024 values per
stage, the stages then pooled together to `embed_dim` (1024-d features).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import mvtec  # noqa: E402
from common.engine.config import PatchCoreConfig  # noqa: E402
from common.engine.features import PatchFeatures  # noqa: E402
from common.engine.maps import anomaly_map  # noqa: E402
from common.engine.metrics import PixelMetrics, image_auroc  # noqa: E402
from common.engine.patchcore import PatchCore  # noqa: E402

REFERENCE_STAGE_DIM = 1024  # patchcore-inspection's pretrain_embed_dimension


class ReferencePatchFeatures(torch.nn.Module):
    """patchcore-inspection's aggregation: unfold 3x3, pool each stage's C*9 vector, pool the stages."""

    def __init__(self, base: PatchFeatures, embed_dim: int) -> None:
        super().__init__()
        self.extractor, self.dim = base.extractor, embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(x)
        grid = maps[0].shape[-2:]
        parts = []
        for fmap in maps:
            b, c, h, w = fmap.shape
            u = F.unfold(fmap.float(), 3, padding=1).reshape(b, c * 9, h, w)
            if (h, w) != grid:
                u = F.interpolate(u, size=grid, mode="bilinear", align_corners=False)
            u = F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(-1, 1, c * 9), REFERENCE_STAGE_DIM)
            parts.append(u.reshape(b, grid[0], grid[1], REFERENCE_STAGE_DIM))
        f = torch.stack(parts, dim=-2).reshape(-1, 1, len(parts) * REFERENCE_STAGE_DIM)
        return F.adaptive_avg_pool1d(f, self.dim).reshape(b, grid[0], grid[1], self.dim).contiguous()


def patch_scores(model: PatchCore, tests: list[mvtec.TestImage]) -> tuple[list, np.ndarray]:
    """Per test image: (position, (h, w) patch distances, input size, geometry); and the image scores."""
    grids, scores = [], np.zeros(len(tests))
    for batch in model._batches([t.path for t in tests]):
        dist, s = model.patch_scores(batch)
        input_hw = (int(batch.tensor.shape[-2]), int(batch.tensor.shape[-1]))
        for i, (pos, geo) in enumerate(zip(batch.positions, batch.geometries, strict=True)):
            grids.append((pos, dist[i], input_hw, geo))
            scores[pos] = s[i]
    return grids, scores


def run(data: Path, category: str, overrides: dict, sigmas: list[float], reference: bool) -> dict:
    model = PatchCore(PatchCoreConfig(**overrides), device="cpu")
    if reference:
        model.features = ReferencePatchFeatures(model.features, model.config.embed_dim)
    t = time.perf_counter()
    fit = model.fit(mvtec.train_images(data, category))
    fit_s = time.perf_counter() - t
    tests = mvtec.test_images(data, category)
    t = time.perf_counter()
    grids, scores = patch_scores(model, tests)
    score_s = time.perf_counter() - t
    out = {"category": category, "config": overrides, "reference_aggregation": reference,
           "resolved_resize": model.config.resize, "scale": model.config.scale, "bank": fit["bank_size"],
           "feature_dim": model.features.dim, "fit_s": round(fit_s, 1), "score_s": round(score_s, 1),
           "image_auroc": round(image_auroc(scores, np.array([t.label for t in tests])), 4)}
    for sigma in sigmas:
        pixels = PixelMetrics()
        for pos, grid, input_hw, geo in grids:
            top, left, h, w = geo.box
            pixels.update(anomaly_map(grid, input_hw, (h, w), sigma, model.features.stride),
                          mvtec.load_mask(tests[pos], geo.orig_hw)[top: top + h, left: left + w],
                          tests[pos].defect_type)
        out[f"sigma_{sigma:g}"] = {"pixel_auroc": round(pixels.pixel_auroc(), 4),
                                   "aupro": round(pixels.aupro(0.3), 4),
                                   "pixel_auroc_per_type": {t: {k: round(v, 4) for k, v in d.items()} for t, d
                                                            in pixels.pixel_auroc_by_group().items()}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--config", action="append", default=None, help="JSON PatchCoreConfig overrides")
    p.add_argument("--sigmas", type=float, nargs="+", default=[4.0])
    p.add_argument("--reference-aggregation", action="store_true")
    a = p.parse_args()
    for overrides in a.config or ["{}"]:
        print(json.dumps(run(a.data, a.category, json.loads(overrides), a.sigmas, a.reference_aggregation)),
              flush=True)


if __name__ == "__main__":
    main()
