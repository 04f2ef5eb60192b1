"""PatchCore: fit a coreset memory bank on nominal images, then score images and draw anomaly masks."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.engine import calibration
from common.engine.artifact import (
    ArtifactError,
    ArtifactIncompatible,
    ModelState,
    load_artifact,
    save_artifact,
)
from common.engine.backbone_cache import shared_backbone
from common.engine.config import PatchCoreConfig
from common.engine.coreset import StreamingProjection, coreset_size, greedy_from_projection
from common.engine.features import PatchFeatures
from common.engine.featurestore import FeatureStore
from common.engine.knn import IndexSpec, IndexState, NearestNeighbors, check_pq_m
from common.engine.loader import Batch, Failed, ImageSource, iter_batches, source_bits, source_sizes
from common.engine.maps import anomaly_map
from common.engine.mvtec import resize_mask
from common.engine.preprocessing import resolve_bit_depth, resolve_resize
from common.engine.roi import RegionOfInterest
from common.engine.scoring import image_scores
from common.engine.spool import needs_spool, spool

IN_SAMPLE_WARNING = ("no held-out image was scored (one training image, holdout_fraction 0, or every held-out image "
                     "failed): the thresholds come from the bank's own images, which lie at or near their own bank "
                     "rows, so they are too low and most images will be flagged; fit on at least two images with "
                     "holdout_fraction > 0")


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


def _no_usable_image(failures: list[Failed]) -> str:
    if not failures:
        return "no training images"
    return f"no usable training image ({len(failures)} failed): " + "; ".join(f.error for f in failures[:3])


def _mask_over_map(mask: np.ndarray, result: ImageResult) -> np.ndarray:
    """A defect mask brought to the image's size (nearest) and cut to the region its map covers."""
    top, left, bh, bw = result.box
    return resize_mask(np.asarray(mask, dtype=bool), result.image_hw)[top: top + bh, left: left + bw]


def _pixel_rule(masks: int, defect_pixels: int) -> str:
    """How labelled calibration sets the pixel threshold: F1-optimal where the masks mark defect pixels
    (within the maps' boxes), else by the fit's nominal rule (with none, F1 is 0 at every threshold)."""
    if defect_pixels:
        return "F1-optimal"
    return "by the nominal rule (" + ("the defect masks mark no pixel" if masks else "no defect masks") + ")"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private torch API: may go away
    return bool(probe()) if probe else False


def _ieee_float32_convolutions() -> None:
    """CUDA convolutions default to TF32 (10-bit mantissa); float32 models want IEEE float32, which gave the
    CPU's scores to 2e-7 on an H200. Process-wide: bf16 models run under autocast anyway. (On torch 2.9 and
    later, code that then reads the legacy `torch.backends.cudnn.allow_tf32` gets torch's mixed-API error.)"""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = False


class PatchCore:
    def __init__(self, config: PatchCoreConfig | None = None, device: str | None = "auto",
                 weights: str | Path | None = None, roi: RegionOfInterest | None = None):
        self.config = config or PatchCoreConfig()
        if roi is not None and self.config.center_crop is not None:
            raise ValueError("a region of interest covers the whole image and does not combine with "
                             "center_crop (which already limits what is inspected): use one of them")
        self.roi = roi  # where images are inspected (`common.engine.roi`); None: everywhere
        self.device = resolve_device(device)
        self._backbone = shared_backbone(self.config.backbone, self.config.layers, weights, self.device)
        self.mean, self.std = self._backbone.mean, self._backbone.std
        self.features = PatchFeatures(self._backbone.extractor, self._backbone.stages, self.config.embed_dim)
        self.index: NearestNeighbors | None = None
        self.image_threshold = float("nan")
        self.pixel_threshold = float("nan")
        self.stats: dict[str, Any] = {}
        if self.config.precision != "bf16" and self.device.type == "cuda":
            _ieee_float32_convolutions()
        if self.config.precision == "bf16" and self.device.type == "cpu" and not _cpu_has_native_bf16():
            warnings.warn("precision bf16 on a CPU without native bfloat16 instructions is emulated: "
                          "measured 1.3x slower than fp32 with AVX-512 and over 20x slower with AVX2 only; "
                          "fit this product with precision auto or fp32 to score it on this CPU",
                          RuntimeWarning, stacklevel=2)

    # ----------------------------------------------------------------------------------- features
    def autocast(self) -> torch.autocast:
        """The arithmetic the backbone runs under: bfloat16 autocast for `precision` bf16, else none, on
        every device. (Until this version auto meant bfloat16 on CUDA: a GPU-fitted model's scores on a CPU
        worker then differed by up to 2 % (image) and 7 % (map maxima), docs/benchmarks.md section 11.)"""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised inputs -> (B, H/8, W/8, D) float32 patch features, on the device."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return self.features(x)

    def _embed(self, batch: Batch) -> torch.Tensor:
        x = batch.tensor
        if self.roi is not None:  # the input is the whole image: no center crop with a region
            x = x * torch.tensor(self.roi.over_image((int(x.shape[-2]), int(x.shape[-1]))))
        return self.embed(x)

    def _batches(self, images: Sequence[ImageSource]):
        return iter_batches(images, self.config, self.mean, self.std, self.config.batch_size)

    def _feature_batches(self, images: Sequence[ImageSource], progress: bool,
                         desc: str) -> Iterator[torch.Tensor | Failed]:
        """(n, D) patch features of each batch, on the model's device, or the images that failed."""
        with tqdm(total=len(images), desc=desc, disable=not progress, unit="img") as bar:
            for item in self._batches(images):
                if isinstance(item, Failed):
                    yield item
                    bar.update(1)
                    continue
                f = self._embed(item)
                yield f.reshape(-1, f.shape[-1])
                bar.update(len(item.positions))

    def extract(self, images: Sequence[ImageSource], progress: bool = False,
                desc: str = "features") -> tuple[np.ndarray, list[Failed]]:
        """All patch features of `images` as one in-memory (N, D) array, plus the images that failed."""
        chunks, failures = [], []
        for item in self._feature_batches(images, progress, desc):
            if isinstance(item, Failed):
                failures.append(item)
            else:
                chunks.append(item.cpu().numpy())
        if not chunks:
            raise ValueError(_no_usable_image(failures))
        return np.concatenate(chunks), failures

    # ---------------------------------------------------------------------------------------- fit
    def fit(self, images: Sequence[ImageSource], progress: bool = False,
            scratch_dir: str | Path | None = None, bank_only: Sequence[ImageSource] = ()) -> dict[str, Any]:
        """Build the memory bank from nominal images and calibrate thresholds on a held-out part.

        `bank_only`: more nominal images that always go into the bank and are never held out (false alarms
        an operator reviewed as good: the point is that the model learns them, not that a held-out one
        raises the threshold). They count among `train_images`; failure positions run on after `images`.

        Memory stays bounded whatever the number of images: patch features go to a temporary file
        (in `scratch_dir`, default `TMPDIR`) batch by batch while their random projection accumulates
        in memory (N x projection_dim float32); the coreset is chosen on the projection and its rows are
        then read back from the file. The `auto` settings are resolved from the training images first;
        when they are, loaders are called once each for both (`spool`)."""
        t0 = time.perf_counter()
        check_pq_m(self.config, self.features.dim)
        sources = [*images, *bank_only]
        if self._surveys_sources() and needs_spool(sources):
            with TemporaryDirectory(prefix="totalrecall-spool-", dir=scratch_dir) as folder:
                spooled = spool(sources, Path(folder), self._feature_store_bound(len(sources)), progress=progress)
                download_seconds = time.perf_counter() - t0
                stats = self._fit(spooled, len(images), progress, scratch_dir, t0)
        else:
            download_seconds, stats = 0.0, self._fit(sources, len(images), progress, scratch_dir, t0)
        stats["download_seconds"] = round(download_seconds, 3)  # spooling's share of extract_seconds
        return stats

    def _surveys_sources(self) -> bool:
        """Whether the fit reads every training image before extracting features, to resolve `auto`
        settings (resize from the sizes, bit_depth from the samples of high-bit images)."""
        return self.config.resize == "auto" or self.config.bit_depth == 0

    def _feature_store_bound(self, n_images: int) -> int:
        """Bytes the fit's feature store may take, with room to spare: an `auto` input has an area of
        about image_size**2 (sides rounded to multiples of 16), on a grid of stride 8 at the finest."""
        patches = 1.25 * (self.config.image_size / 8) ** 2
        return int(n_images * patches * self.features.dim * 4) + 256 * 2**20

    def _fit(self, images: Sequence[ImageSource], n_holdout_pool: int, progress: bool,
             scratch_dir: str | Path | None, t0: float) -> dict[str, Any]:
        """Fit on `images`, of which only the first `n_holdout_pool` may be held out."""
        if self.config.resize == "auto":
            self.config = resolve_resize(self.config, source_sizes(images))
        if self.config.bit_depth == 0:
            self.config = resolve_bit_depth(self.config, source_bits(images))
        cfg = self.config
        bank_ids, hold_ids = calibration.holdout_split(n_holdout_pool, cfg.holdout_fraction, cfg.seed)
        bank_ids = np.concatenate([bank_ids, np.arange(n_holdout_pool, len(images))])
        projection = StreamingProjection(self.features.dim, cfg.projection_dim, cfg.seed, self.device,
                                         folder=scratch_dir)
        with FeatureStore(self.features.dim, scratch_dir) as store:
            try:
                failures: list[Failed] = []
                for item in self._feature_batches([images[i] for i in bank_ids], progress, "features"):
                    if isinstance(item, Failed):
                        failures.append(item)
                        continue
                    projection.add(item)
                    store.append(item.cpu().numpy())
                if not len(store):
                    raise ValueError(_no_usable_image(failures))
                projected = projection.finish()
            finally:
                projection.close()
            t1 = time.perf_counter()
            n_patches, store_mb = len(store), store.nbytes / 2**20
            k = coreset_size(n_patches, cfg.coreset_ratio, cfg.coreset_min_size)
            with tqdm(total=k, desc="coreset", disable=not progress, unit="pt") as bar:
                selected = greedy_from_projection(projected, cfg.coreset_ratio, cfg.seed, bar.update,
                                                  cfg.coreset_min_size)
                bar.update(k - bar.n)
            del projected, projection
            bank = store.gather(selected)
            t2 = time.perf_counter()
        self.set_bank(bank)
        del bank
        t_index = time.perf_counter()
        levels, errors = self._nominal_levels([images[i] for i in hold_ids], progress, "calibrate")
        in_sample = not levels  # one training image, or every held-out image failed to decode
        if in_sample:
            warnings.warn(IN_SAMPLE_WARNING, RuntimeWarning, stacklevel=3)
            levels = self._nominal_levels([images[i] for i in bank_ids], False, "calibrate")[0]
        good = [levels[pos] for pos in sorted(levels)]
        self.image_threshold = calibration.nominal_threshold([score for score, _ in good])
        self.pixel_threshold = calibration.nominal_threshold([peak for _, peak in good])
        t3 = time.perf_counter()
        self.stats = {
            "train_images": len(bank_ids) - len(failures),
            "holdout_images": 0 if in_sample else len(good),
            "calibration": "in-sample (no usable held-out image)" if in_sample else calibration.RULE,
            # genuine held-out scores only (a false-alarm budget and the nominal median count them); the bank
            # images' own, near their bank rows, are kept apart
            "holdout_scores": [] if in_sample else [round(score, 6) for score, _ in good],
            "failed_images": [{"position": int(bank_ids[f.position]), "error": f.error} for f in failures]
            + [{"position": int(hold_ids[i]), "error": error} for i, error in sorted(errors.items())],
            "patch_features": int(n_patches),
            "bank_size": int(len(selected)),
            "feature_store_mb": round(store_mb, 1),
            "feature_dim": int(self.features.dim),
            "extract_seconds": round(t1 - t0, 3),
            "coreset_seconds": round(t2 - t1, 3),
            "index": self.index.spec.kind,
            "index_seconds": round(t_index - t2, 3),
            "calibrate_seconds": round(t3 - t_index, 3),  # thresholds only; the index build is index_seconds
            "fit_seconds": round(t3 - t0, 3),
            "device": str(self.device),
        }
        if in_sample:
            self.stats["in_sample_scores"] = [round(score, 6) for score, _ in good]
        if self.roi is not None:
            self.stats["roi_fraction"] = round(self.roi.fraction, 4)  # of the image that is inspected
        return self.stats

    def _nominal_levels(self, images: Sequence[ImageSource], progress: bool,
                        desc: str) -> tuple[dict[int, tuple[float, float]], dict[int, str]]:
        """(image score, anomaly map's maximum) of each image that scores, by position, and the error of
        each that does not. The maps are dropped as they come: a fit never holds full-size maps."""
        levels: dict[int, tuple[float, float]] = {}
        errors: dict[int, str] = {}
        for pos, result in self.iter_predict(images, progress, desc):
            if result.ok:
                levels[pos] = (float(result.score), float(result.anomaly_map.max()))
            else:
                errors[pos] = result.error or "not processed"
        return levels, errors

    def set_bank(self, bank: np.ndarray, index_state: IndexState | None = None) -> None:
        """Search `bank` with the index the config asks for at its size (IVF: trained now, or rebuilt
        from `index_state`)."""
        spec = IndexSpec.for_bank(self.config, len(bank), bank.shape[1])
        if index_state is not None and index_state.spec != spec:
            raise ValueError(f"stored index {index_state.spec} does not match the config ({spec})")
        self.index = NearestNeighbors(bank, use_gpu=self.device.type == "cuda", spec=spec, state=index_state,
                                      gpu_device=self.device.index)  # cuda:1's bank on GPU 1

    def calibrate_with_labels(self, images: Sequence[ImageSource], masks: Sequence[np.ndarray | None],
                              labels: Sequence[int], max_false_alarms: float | None = None) -> tuple[float, float]:
        """Replace the nominal thresholds by F1-optimal ones from labelled validation images (label 1:
        defective). The image threshold comes from every image that decodes, or, with `max_false_alarms`,
        is the lowest that flags at most that fraction of the nominal images (these and the fit's held-out
        ones: `calibration.false_alarm_threshold`), whatever the mix; the pixel threshold from the
        nominal images and the defective ones with a mask (a boolean array of the image's size, resized if
        not; None: no mask), and stays at the nominal rule when no mask marks a defect pixel. Needs a nominal
        and a defective image that decode. What was used goes to `stats["validation_set"]`. Streams: one
        image's map and mask at a time (`masks` may read each mask when it is indexed)."""
        from common.engine.metrics import PixelMetrics

        if not len(images) == len(masks) == len(labels):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(labels)} labels")
        pixels = PixelMetrics()
        scores, ys, failed, masked = [], [], [], 0
        for i, r in self.iter_predict(images, desc="calibrate"):
            if not r.ok:
                failed.append({"position": i, "error": r.error})
                continue
            y = int(labels[i])
            scores.append(r.score)
            ys.append(y)
            m = masks[i] if y == 1 else None
            if y == 0 or m is not None:
                pixels.update(r.anomaly_map, None if m is None else _mask_over_map(m, r))
                masked += int(m is not None)
        if 0 not in ys or 1 not in ys:
            raise ValueError(f"F1 calibration needs nominal and defective validation images: {ys.count(0)} "
                             f"nominal and {ys.count(1)} defective decoded ({len(failed)} failed)")
        if max_false_alarms is None:
            self.image_threshold = calibration.f1_image_threshold(scores, ys)
            image_rule = "F1-optimal"
        else:
            nominal = [sc for sc, y in zip(scores, ys, strict=True) if y == 0] + list(self.stats.get("holdout_scores", []))
            self.image_threshold = calibration.false_alarm_threshold(nominal, max_false_alarms)
            image_rule = f"at most {max_false_alarms:.1%} false alarms on {len(nominal)} nominal images"
        if pixels.defect_pixels:
            self.pixel_threshold = calibration.f1_pixel_threshold(pixels)
        self.stats["calibration"] = (
            f"labelled validation images: image threshold {image_rule}, pixel threshold "
            + _pixel_rule(masked, pixels.defect_pixels))
        self.stats["validation_set"] = {"nominal": ys.count(0), "defective": ys.count(1),
                                        "defective_with_mask": masked, "failed_images": failed,
                                        "max_false_alarms": max_false_alarms}
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

    def nearest(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, tuple[int, int]]:
        """Features (B, P, D), distances and ids (B, P) of each patch's nearest bank feature (0 outside a
        region of interest), how many patches count for the image score, and the (h, w) grid."""
        feats = self._embed(batch)
        b, h, w, d = feats.shape
        flat = feats.reshape(-1, d).cpu().numpy()
        dist, ids = self.index.search(flat, 1)
        dist, ids = dist.reshape(b, h * w), ids.reshape(b, h * w)
        counted = h * w
        if self.roi is not None:  # outside: 0, below any distance, so the image score's patches lie inside
            input_hw = (int(batch.tensor.shape[-2]), int(batch.tensor.shape[-1]))
            inside = self.roi.on_grid((h, w), input_hw, self.features.stride).reshape(1, -1)
            dist, counted = np.where(inside, dist, np.float32(0)), int(inside.sum())
        return flat.reshape(b, h * w, d), dist, ids, counted, (h, w)

    def patch_scores(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(B, h, w) distances of each patch to its nearest bank feature, and the (B,) Eq. 7 image scores."""
        feats, dist, ids, counted, grid = self.nearest(batch)
        scores = image_scores(feats, dist, ids, self.index, self.config.num_neighbors, self.config.image_score_top,
                              counted)
        return dist.reshape(len(dist), *grid), scores

    def _score_batch(self, batch: Batch) -> list[ImageResult]:
        dist, scores = self.patch_scores(batch)
        input_hw = (int(batch.tensor.shape[-2]), int(batch.tensor.shape[-1]))
        out = []
        for i, geo in enumerate(batch.geometries):
            top, left, bh, bw = geo.box
            amap = anomaly_map(dist[i], input_hw, (bh, bw), self.config.sigma, self.features.stride)
            if self.roi is not None:  # the box is the whole image: no center crop with a region
                amap *= self.roi.over_image((bh, bw))
            mask = amap > self.pixel_threshold
            y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
            out.append(ImageResult(
                score=float(scores[i]), is_anomalous=bool(scores[i] > self.image_threshold),
                anomaly_map=amap, mask=mask, max_location=(int(y) + top, int(x) + left),
                defect_fraction=float(np.count_nonzero(mask) / mask.size), box=geo.box, image_hw=geo.orig_hw,
            ))
        return out

    # -------------------------------------------------------------------------------- persistence
    def state(self) -> ModelState:
        if self.index is None:
            raise RuntimeError("nothing to save: the model is not fitted")
        index_state = self.index.state
        index, tensors = None, {}
        if index_state is not None:
            index = index_state.spec.to_dict()
            tensors = {"index": index_state.trained, "index_lists": index_state.lists}
        return ModelState(self.config, self.index.bank, self.image_threshold, self.pixel_threshold,
                          self.stats, index, tensors, None if self.roi is None else self.roi.mask,
                          self._backbone.weights_sha256)

    def save(self, folder: str | Path) -> str:
        return save_artifact(folder, self.state())

    @classmethod
    def load(cls, folder: str | Path, expected_sha256: str | None = None, device: str | None = "auto",
             weights: str | Path | None = None) -> PatchCore:
        state = load_artifact(folder, expected_sha256)
        try:
            roi = None if state.roi is None else RegionOfInterest(state.roi)
        except ValueError as exc:
            raise ArtifactError(f"artifact region of interest unusable: {exc}") from exc
        model = cls(state.config, device=device, weights=weights, roi=roi)
        if state.backbone_sha256 not in (None, model._backbone.weights_sha256):
            raise ArtifactIncompatible(
                f"the model was fitted with other {state.config.backbone} weights than these "
                f"(sha256 {state.backbone_sha256[:12]}... fitted, {model._backbone.weights_sha256[:12]}... "
                f"loaded{f' from {weights}' if weights else ''}): its scores would not mean what its "
                "thresholds say; load it with the weights it was fitted with, or fit it again")
        if state.bank.shape[1] != model.features.dim:
            raise ArtifactIncompatible(f"bank has {state.bank.shape[1]}-d features, {state.config.backbone} "
                                f"with this config produces {model.features.dim}-d")
        spec = IndexSpec.for_bank(state.config, len(state.bank), state.bank.shape[1])
        if spec.approximate != (state.index is not None):
            raise ArtifactError(f"the config asks for a {spec.kind!r} index, the artifact "
                                f"{'has' if state.index else 'lacks'} a stored approximate index")
        index_state = None
        if state.index is not None:
            try:
                index_state = IndexState(IndexSpec(**state.index), state.index_tensors["index"],
                                         state.index_tensors["index_lists"])
            except TypeError as exc:
                raise ArtifactError(f"artifact index parameters unreadable: {exc}") from exc
        try:
            model.set_bank(state.bank, index_state)
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"artifact index unusable: {exc}") from exc
        model.image_threshold, model.pixel_threshold = state.image_threshold, state.pixel_threshold
        model.stats = state.stats
        return model
