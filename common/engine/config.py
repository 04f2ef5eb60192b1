"""PatchCore settings: everything that changes the model's output, stored with every artifact."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any

RESIZE_MODES = ("auto", "keep_aspect", "square", "scale")
INDEX_TYPES = ("flat", "ivf_flat", "ivf_pq")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_SEED = 2**31 - 1  # faiss ClusteringParameters.seed is a C int
# `common.engine.backbones.BACKBONES` builds these; their stages (feature maps) a model may take as
# `layers`, named here so that checking a setting needs no torch (a test checks them against the networks)
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_LITE_STAGES = tuple(f"blocks.{i}" for i in range(7))
BACKBONE_STAGES: dict[str, tuple[str, ...]] = {
    "wide_resnet50_2": _RESNET_STAGES,
    "resnet18": _RESNET_STAGES,
    **{f"efficientnet_lite{v}": _LITE_STAGES for v in (0, 1, 2)},
}
BACKBONE_NAMES = tuple(BACKBONE_STAGES)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class PatchCoreConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None  # None: the backbone's stride-8 and stride-16 stages
    image_size: int = 288  # keep_aspect: input area is image_size**2; square: image_size x image_size
    # auto (resolved by fit): keep_aspect when the training images share one size, else scale with the
    # factor that brings the largest training image to an area of image_size**2 (see preprocessing)
    resize: str = "auto"
    scale: float = 0.5  # resize="scale": every image is resized by this factor (constant pixel size)
    center_crop: int | None = None  # paper protocol: image_size=256, resize="square", center_crop=224
    embed_dim: int = 1024  # fixed patch-feature dimension budget, split evenly between the layers
    projection_dim: int = 128  # random projection the coreset is computed on
    coreset_ratio: float = 0.01  # at 288 px as accurate as 10 % (docs/benchmarks.md), a tenth of the kNN
    # but never fewer features than this (or all of them): a small training set keeps its coverage
    coreset_min_size: int = 1000
    seed: int = 0
    num_neighbors: int = 9  # b of the paper's Eq. 7; 0 turns the reweighting off
    # the image score's s*: the mean of the highest this fraction of the patch distances (at least one),
    # steadier than the paper's single maximum (0: the paper's; docs/benchmarks.md section 2). Artifacts
    # from before this setting have no such field and keep the maximum they were calibrated with.
    image_score_top: float = 0.02
    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in model-input pixels
    holdout_fraction: float = 0.1  # nominal images kept out of the bank to calibrate thresholds
    batch_size: int = 8
    # backbone arithmetic: auto and fp32 = IEEE float32 on every device, so a model scores the same on
    # GPU and CPU workers (auto is the stored default of earlier versions, when it meant bfloat16 on
    # CUDA); bf16 = bfloat16 autocast on every device: half the backbone's CPU time on CPUs with AMX,
    # scores a few percent off float32's (docs/benchmarks.md sections 4 and 11)
    precision: str = "auto"
    # significant bits of images stored with more than 8 bits a sample (12 for a Mono12 camera writing
    # 16-bit files): their values are scaled from 0..2**bit_depth-1 to 8 bits, the same for every image of
    # the product. 0 (auto, resolved by fit): the most bits any training image uses, at least 8; left at 0
    # (no such training image, or an artifact from before this setting), the container's full range
    bit_depth: int = 0
    index: str = "flat"  # kNN index: "flat" (exact), "ivf_flat" or "ivf_pq" (approximate, large banks)
    index_min_bank: int = 100_000  # banks smaller than this always get the exact index
    index_nlist: int = 0  # IVF coarse lists; 0: about 4 * sqrt(bank size)
    index_nprobe: int = 16  # IVF lists searched per query
    index_pq_m: int = 0  # IVF-PQ bytes per feature; 0: a divisor of the feature dimension near dim / 4

    def __post_init__(self) -> None:
        for field in fields(self):  # annotations are strings here (postponed evaluation)
            if field.name in ("seed", "num_neighbors", "sigma"):
                continue  # checked below, with what they may be
            value = getattr(self, field.name)
            if field.type in ("int", "int | None"):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)  # 288.0: accepted before this check, and stored so in older artifacts
                    object.__setattr__(self, field.name, value)
                if not (_is_int(value) or (value is None and field.type == "int | None")):
                    raise ValueError(f"{field.name} must be an integer, not {value!r}")
            if field.type == "float" and not (isinstance(value, Real) and not isinstance(value, bool)
                                              and math.isfinite(value)):
                raise ValueError(f"{field.name} must be a finite number, not {value!r}")
        if self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONE_NAMES)}")
        if self.layers is not None and (isinstance(self.layers, str) or not self.layers
                                        or not all(isinstance(n, str) and n for n in self.layers)):
            raise ValueError(f"layers must be stage names such as blocks.2,blocks.4, not {self.layers!r}")
        if self.embed_dim < (len(self.layers) if self.layers else 2):  # default: two stages
            raise ValueError("embed_dim must give each layer at least one dimension")
        if self.projection_dim < 1 or self.batch_size < 1:
            raise ValueError("projection_dim and batch_size must be >= 1")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if not 0 < self.scale <= 4:
            raise ValueError("scale must be in (0, 4]")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError("coreset_ratio must be in (0, 1]")
        if self.coreset_min_size < 0:
            raise ValueError("coreset_min_size must be >= 0")
        if not _is_int(self.num_neighbors) or self.num_neighbors == 1 or self.num_neighbors < 0:
            raise ValueError(f"num_neighbors (b of Eq. 7) must be an integer, 0 (off) or >= 2, not "
                             f"{self.num_neighbors!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, not {self.seed!r}")
        if not (isinstance(self.sigma, Real) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a number >= 0 (0: no smoothing), not {self.sigma!r}")
        if not 0 <= self.image_score_top <= 1:
            raise ValueError("image_score_top must be in [0, 1] (0: the highest patch distance alone)")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if self.image_size < 32 or (self.center_crop is not None and not 0 < self.center_crop <= self.image_size):
            raise ValueError("image_size must be >= 32 and center_crop in 1..image_size")
        if self.center_crop is not None and self.resize != "square":
            raise ValueError("center_crop needs resize='square' (the paper's 256 -> 224 protocol); "
                             "keep_aspect keeps the whole field of view")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.bit_depth != 0 and not 8 <= self.bit_depth <= 16:
            raise ValueError("bit_depth must be 0 (auto) or 8..16")
        if self.index not in INDEX_TYPES:
            raise ValueError(f"index must be one of {INDEX_TYPES}, not {self.index!r}")
        if min(self.index_min_bank, self.index_nlist, self.index_pq_m) < 0 or self.index_nprobe < 1:
            raise ValueError("index_min_bank, index_nlist and index_pq_m must be >= 0, index_nprobe >= 1")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def check_new(self) -> None:
        """Checks for settings being made (`product add/set`), not in `__post_init__`, because versions
        before them accepted more and their stored settings and artifacts must still load: layers must be
        stages of the backbone (not any top-level module, e.g. `conv_head`), each named once, and the seed
        must fit the 32-bit seeds of faiss' k-means (torch refuses beyond 64 bits, at fit time)."""
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED}, not {self.seed}")
        if self.layers is None:
            return
        stages = BACKBONE_STAGES[self.backbone]
        unknown = [name for name in self.layers if name not in stages]
        if unknown:
            raise ValueError(f"unknown layer(s) {', '.join(unknown)} for {self.backbone}: choose from "
                             f"{', '.join(stages)} (or no layers: its stride-8 and stride-16 stages)")
        if len(set(self.layers)) < len(self.layers):
            raise ValueError(f"layers name a stage twice: {','.join(self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PatchCore setting(s): {sorted(unknown)}")
        return cls(**data)
