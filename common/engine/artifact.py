"""Model artifact: `bank.safetensors` (the memory bank) + `model.json` (config, thresholds, stats).

No pickle anywhere. `model.json` records the bank file's sha256 and is itself hashed: that hash is the
artifact's identity (stored in the database, used as the workers' cache key). Loading verifies both.
A model with an approximate (IVF) index also stores, in the same safetensors file, the trained faiss
index (`faiss.serialize_index` bytes as a uint8 tensor) and each bank row's inverted list; `model.json`
then has format version 2, the index parameters and each of these tensors' sha256. A model with a region
of interest stores its mask there too (`roi`, uint8), and `model.json` its shape.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from common.engine.config import PatchCoreConfig

FORMAT = "totalrecall.patchcore"
FORMAT_VERSION = 1  # exact index: the bank alone
FORMAT_VERSION_INDEX = 2  # with a stored approximate index
# settings added after artifacts were first written, at the value that reproduces those artifacts' scores
PRE_SETTING_DEFAULTS = {"image_score_top": 0.0}
INDEX_TENSORS = ("index", "index_lists")
ROI_TENSOR = "roi"  # optional (H, W) uint8 region of interest, in the same file (older code refuses it)
BANK_FILE = "bank.safetensors"
META_FILE = "model.json"


class ArtifactError(ValueError):
    """The artifact is corrupt, incomplete or incompatible with this code."""


class ArtifactIncompatible(ArtifactError):
    """The artifact is intact (its checksums match) but this code, or these backbone weights, cannot use
    it: another copy of it would fail the same way."""


@dataclass
class ModelState:
    config: PatchCoreConfig
    bank: np.ndarray  # (M, D) float32
    image_threshold: float
    pixel_threshold: float
    stats: dict[str, Any] = field(default_factory=dict)  # counts, timings, calibration details
    index: dict[str, Any] | None = None  # approximate index parameters (knn.IndexSpec); None: exact
    index_tensors: dict[str, np.ndarray] = field(default_factory=dict)  # INDEX_TENSORS, with `index`
    roi: np.ndarray | None = None  # (H, W) bool region of interest (`common.engine.roi`); None: everywhere
    backbone_sha256: str | None = None  # `backbone_cache.weights_digest` of the fit's backbone (None: older)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import faiss
    import timm
    import torch
    import torchvision

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "faiss": faiss.__version__}


def save_artifact(folder: str | Path, state: ModelState) -> str:
    """Write the artifact into `folder`; returns its sha256 (of model.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bank_path = folder / BANK_FILE
    if (state.index is None) != (not state.index_tensors) or (
            state.index_tensors and sorted(state.index_tensors) != sorted(INDEX_TENSORS)):
        raise ValueError(f"an approximate index needs exactly the tensors {INDEX_TENSORS}")
    tensors = {"bank": np.ascontiguousarray(state.bank, dtype=np.float32),
               **{k: np.ascontiguousarray(v) for k, v in state.index_tensors.items()}}
    if state.roi is not None:
        tensors[ROI_TENSOR] = np.ascontiguousarray(state.roi, dtype=np.uint8)
    save_file(tensors, str(bank_path))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if state.index is None else FORMAT_VERSION_INDEX,
        "config": state.config.to_dict(),
        "bank_shape": list(state.bank.shape),
        "bank_sha256": sha256_file(bank_path),
        "image_threshold": state.image_threshold,
        "pixel_threshold": state.pixel_threshold,
        "stats": state.stats,
        "versions": library_versions(),
    }
    if state.roi is not None:
        meta["roi_shape"] = list(state.roi.shape)
    if state.backbone_sha256 is not None:
        meta["backbone_sha256"] = state.backbone_sha256
    if state.index is not None:
        meta["index"] = {**state.index, "tensor_sha256": {k: _sha256_array(tensors[k]) for k in INDEX_TENSORS}}
    data = json.dumps(meta, indent=2, sort_keys=True).encode()
    (folder / META_FILE).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_artifact(folder: str | Path, expected_sha256: str | None = None) -> ModelState:
    folder = Path(folder)
    meta_path, bank_path = folder / META_FILE, folder / BANK_FILE
    if not meta_path.is_file() or not bank_path.is_file():
        raise ArtifactError(f"incomplete model artifact in {folder}: needs {META_FILE} and {BANK_FILE}")
    data = meta_path.read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ArtifactError(f"{meta_path}: sha256 mismatch (artifact corrupted or replaced)")
    try:
        meta = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{meta_path} is not valid JSON: {exc}") from exc
    try:
        return _state_from(meta, bank_path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{meta_path} lacks or mistypes a field ({exc.__class__.__name__}: {exc})") from exc


def _sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def _state_from(meta: dict[str, Any], bank_path: Path) -> ModelState:
    version = meta.get("format_version")
    if meta.get("format") != FORMAT or version not in (FORMAT_VERSION, FORMAT_VERSION_INDEX):
        raise ArtifactIncompatible(f"unsupported artifact format {meta.get('format')!r} v{version}; this code "
                            f"reads {FORMAT} v{FORMAT_VERSION} and v{FORMAT_VERSION_INDEX}")
    if sha256_file(bank_path) != meta["bank_sha256"]:
        raise ArtifactError(f"{bank_path}: sha256 mismatch (memory bank corrupted)")
    try:
        config = PatchCoreConfig.from_dict({**PRE_SETTING_DEFAULTS, **meta["config"]})
    except (TypeError, ValueError) as exc:
        raise ArtifactIncompatible(f"artifact config incompatible with this code: {exc}") from exc
    tensors = load_file(str(bank_path))
    bank = tensors.pop("bank")
    if list(bank.shape) != meta["bank_shape"] or bank.dtype != np.float32:
        raise ArtifactError(f"memory bank is {bank.shape} {bank.dtype}, config says {meta['bank_shape']}")
    roi = tensors.pop(ROI_TENSOR, None)
    if (roi is None) != ("roi_shape" not in meta) or (roi is not None and list(roi.shape) != meta["roi_shape"]):
        raise ArtifactError(f"{bank_path}: region of interest {None if roi is None else list(roi.shape)}, "
                            f"{META_FILE} says {meta.get('roi_shape')}")
    index = meta.get("index") if version == FORMAT_VERSION_INDEX else None
    if index is None:
        if tensors or "index" in meta:
            raise ArtifactError(f"{bank_path}: unexpected tensors {sorted(tensors)} for an exact index")
        tensors = {}
    else:
        index = dict(index)
        expected = index.pop("tensor_sha256")
        if sorted(tensors) != sorted(INDEX_TENSORS) or sorted(expected) != sorted(INDEX_TENSORS):
            raise ArtifactError(f"{bank_path}: the stored index needs tensors {INDEX_TENSORS}, "
                                f"found {sorted(tensors)}")
        for name, array in tensors.items():
            if _sha256_array(array) != expected[name]:
                raise ArtifactError(f"{bank_path}: sha256 mismatch of tensor {name!r} (index corrupted)")
    return ModelState(config, bank, float(meta["image_threshold"]), float(meta["pixel_threshold"]),
                      meta.get("stats", {}), index, tensors, None if roi is None else roi.astype(bool),
                      meta.get("backbone_sha256"))
