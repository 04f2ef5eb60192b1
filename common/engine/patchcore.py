"""PatchCore: fit a coreset memory bank on nominal images, then score images and draw anomaly masks."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.engine import calibration
from common.engine.artifact import ArtifactError, ModelState, load_artifact, save_artifact
from common.engine.backbones import fold_batchnorm, load_extractor
from common.engine.config import PatchCoreConfig
from common.engine.coreset import coreset_size, greedy_coreset
from common.engine.features import PatchFeatures, probe_channels
from common.engine.knn import NearestNeighbors
from common.engine.loader import Batch, Failed, ImageSource, iter_batches
from common.engine.scoring import image_scores, smooth_maps, to_image_resolution


@dataclass
class ImageResult:
    """One image's outcome; on failure only `error` is set."""

    score: float | None = None
    is_anomalous: bool | None = None
    anomaly_map: np.ndarray | None = None  # (H, W) float32 over `box` of the original image
    mask: np.ndarray | None = None  # (H, W) bool, anomaly_map > pixel threshold
    max_location: tuple[int, int] | None = None  # (y, x) of the map's maximum, original pixels
    defect_fraction: float | None = None
    box: tuple[int, int, int, int] | None = None  # top, left, height, width the map covers
    image_hw: tuple[int, int] | None = None  # size of the decoded (EXIF-rotated) image
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class PatchCore:
    def __init__(self, config: PatchCoreConfig | None = None, device: str | None = "auto",
                 weights: str | Path | None = None):
        self.config = config or PatchCoreConfig()
        self.device = resolve_device(device)
        extractor, spec = load_extractor(self.config.backbone, self.config.layers, weights)
        extractor = fold_batchnorm(extractor).to(self.device)
        if self.device.type in ("cpu", "cuda"):
            extractor = extractor.to(memory_format=torch.channels_last)
        self.mean, self.std = spec.mean, spec.std
        self.features = PatchFeatures(extractor, probe_channels(extractor), self.config.embed_dim)
        self.index: NearestNeighbors | None = None
        self.image_threshold = float("nan")
        self.pixel_threshold = float("nan")
        self.stats: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- features
    def _embed(self, batch: Batch) -> torch.Tensor:
        x = batch.tensor.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.features(x)
        return self.features(x)

    def _batches(self, images: Sequence[ImageSource]):
        return iter_batches(images, self.config, self.mean, self.std, self.config.batch_size)

    def extract(self, images: Sequence[ImageSource], progress: bool = False,
                desc: str = "features") -> tuple[np.ndarray, list[Failed]]:
        """All patch features of `images` as one (N, D) array, plus the images that failed."""
        chunks, failures = [], []
        with tqdm(total=len(images), desc=desc, disable=not progress, unit="img") as bar:
            for item in self._batches(images):
                if isinstance(item, Failed):
                    failures.append(item)
                    bar.update(1)
                    continue
                f = self._embed(item)
                chunks.append(f.reshape(-1, f.shape[-1]).cpu().numpy())
                bar.update(len(item.positions))
        if not chunks:
            raise ValueError("no usable training image: " + "; ".join(f.error for f in failures[:3]))
        return np.concatenate(chunks), failures

    # ---------------------------------------------------------------------------------------- fit
    def fit(self, images: Sequence[ImageSource], progress: bool = False) -> dict[str, Any]:
        """Build the memory bank from nominal images and calibrate thresholds on a held-out part."""
        cfg = self.config
        t0 = time.perf_counter()
        bank_ids, hold_ids = calibration.holdout_split(len(images), cfg.holdout_fraction, cfg.seed)
        feats, failures = self.extract([images[i] for i in bank_ids], progress, "features")
        t1 = time.perf_counter()
        k = coreset_size(len(feats), cfg.coreset_ratio)
        with tqdm(total=k, desc="coreset", disable=not progress, unit="pt") as bar:
            selected = greedy_coreset(feats, cfg.coreset_ratio, cfg.projection_dim, cfg.seed, bar.update)
            bar.update(k - bar.n)
        t2 = time.perf_counter()
        self.set_bank(feats[selected])
        n_patches = len(feats)
        del feats
        results = self.predict([images[i] for i in hold_ids], progress=progress, desc="calibrate")
        good = [r for r in results if r.ok]
        in_sample = not good  # one training image, or every held-out image failed to decode
        if in_sample:
            good = [r for r in self.predict([images[i] for i in bank_ids]) if r.ok]
        self.image_threshold = calibration.nominal_threshold([r.score for r in good])
        self.pixel_threshold = calibration.nominal_threshold([float(r.anomaly_map.max()) for r in good])
        t3 = time.perf_counter()
        self.stats = {
            "train_images": len(bank_ids) - len(failures),
            "holdout_images": 0 if in_sample else len(good),
            "calibration": "in-sample (no usable held-out image)" if in_sample else calibration.RULE,
            "holdout_scores": [round(float(r.score), 6) for r in good],
            "failed_images": [{"position": int(bank_ids[f.position]), "error": f.error} for f in failures]
            + [{"position": int(hold_ids[i]), "error": r.error} for i, r in enumerate(results) if not r.ok],
            "patch_features": int(n_patches),
            "bank_size": int(len(selected)),
            "feature_dim": int(self.features.dim),
            "extract_seconds": round(t1 - t0, 3),
            "coreset_seconds": round(t2 - t1, 3),
            "calibrate_seconds": round(t3 - t2, 3),
            "fit_seconds": round(t3 - t0, 3),
            "device": str(self.device),
        }
        return self.stats

    def set_bank(self, bank: np.ndarray) -> None:
        self.index = NearestNeighbors(bank, use_gpu=self.device.type == "cuda")

    def calibrate_with_labels(self, images: Sequence[ImageSource], masks: Sequence[np.ndarray | None],
                              labels: Sequence[int]) -> tuple[float, float]:
        """Replace the nominal thresholds by F1-optimal ones from labelled validation images."""
        from common.engine.metrics import PixelMetrics

        pixels = PixelMetrics()
        scores, ys = [], []
        for r, m, y in zip(self.predict(images), masks, labels, strict=True):
            if r.ok:
                pixels.update(r.anomaly_map, m)
                scores.append(r.score)
                ys.append(y)
        self.image_threshold, self.pixel_threshold = calibration.f1_thresholds(scores, ys, pixels)
        self.stats["calibration"] = "F1-optimal on labelled validation images"
        return self.image_threshold, self.pixel_threshold

    # -------------------------------------------------------------------------------------- score
    def predict(self, images: Sequence[ImageSource], progress: bool = False,
                desc: str = "scoring") -> list[ImageResult]:
        results: list[ImageResult] = [ImageResult(error="not processed")] * len(images)
        for pos, res in self.iter_predict(images, progress, desc):
            results[pos] = res
        return results

    def iter_predict(self, images: Sequence[ImageSource], progress: bool = False,
                     desc: str = "scoring") -> Iterator[tuple[int, ImageResult]]:
        """(position, result) for every image, in input order per batch; failures included."""
        if self.index is None:
            raise RuntimeError("model has no memory bank: fit() or load() it first")
        with tqdm(total=len(images), desc=desc, disable=not progress, unit="img") as bar:
            for item in self._batches(images):
                if isinstance(item, Failed):
                    yield item.position, ImageResult(error=item.error)
                    bar.update(1)
                    continue
                yield from zip(item.positions, self._score_batch(item), strict=True)
                bar.update(len(item.positions))

    def _score_batch(self, batch: Batch) -> list[ImageResult]:
        feats = self._embed(batch)
        b, h, w, d = feats.shape
        flat = feats.reshape(-1, d).cpu().numpy()
        dist, ids = self.index.search(flat, 1)
        dist, ids = dist.reshape(b, h * w), ids.reshape(b, h * w)
        scores = image_scores(flat.reshape(b, h * w, d), dist, ids, self.index, self.config.num_neighbors)
        smoothed = smooth_maps(torch.from_numpy(dist).reshape(b, h, w), batch.tensor.shape[-2:],
                               self.config.sigma)
        out = []
        for i, geo in enumerate(batch.geometries):
            top, left, bh, bw = geo.box
            amap = to_image_resolution(smoothed[i], (bh, bw))
            mask = amap > self.pixel_threshold
            y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
            out.append(ImageResult(
                score=float(scores[i]), is_anomalous=bool(scores[i] > self.image_threshold),
                anomaly_map=amap, mask=mask, max_location=(int(y) + top, int(x) + left),
                defect_fraction=float(mask.mean()), box=geo.box, image_hw=geo.orig_hw,
            ))
        return out

    # -------------------------------------------------------------------------------- persistence
    def state(self) -> ModelState:
        if self.index is None:
            raise RuntimeError("nothing to save: the model is not fitted")
        return ModelState(self.config, self.index.bank, self.image_threshold, self.pixel_threshold,
                          self.stats)

    def save(self, folder: str | Path) -> str:
        return save_artifact(folder, self.state())

    @classmethod
    def load(cls, folder: str | Path, expected_sha256: str | None = None, device: str | None = "auto",
             weights: str | Path | None = None) -> PatchCore:
        state = load_artifact(folder, expected_sha256)
        model = cls(state.config, device=device, weights=weights)
        if state.bank.shape[1] != model.features.dim:
            raise ArtifactError(f"bank has {state.bank.shape[1]}-d features, {state.config.backbone} "
                                f"with this config produces {model.features.dim}-d")
        model.set_bank(state.bank)
        model.image_threshold, model.pixel_threshold = state.image_threshold, state.pixel_threshold
        model.stats = state.stats
        return model
