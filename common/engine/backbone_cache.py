"""Backbones shared between models: a worker holding many products' models keeps one copy per backbone.

The truncated, BatchNorm-folded network is only used for inference (no state changes), so one instance
can serve every model and thread of the process; it is freed with the last model that uses it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from pathlib import Path

import torch

from common.engine.backbones import fold_batchnorm, get_spec, load_extractor, static_same_padding
from common.engine.features import probe_stages


class Backbone:
    """A ready truncated backbone (BatchNorm folded, TF padding without copies, channels-last, on its
    device) and its input normalisation."""

    def __init__(self, name: str, layers: tuple[str, ...] | None, weights: str | Path | None,
                 device: torch.device) -> None:
        extractor, spec = load_extractor(name, layers, weights)
        self.weights_sha256 = weights_digest(extractor)
        extractor = static_same_padding(fold_batchnorm(extractor)).to(device)
        if device.type in ("cpu", "cuda"):
            extractor = extractor.to(memory_format=torch.channels_last)
        self.extractor = extractor
        self.mean, self.std = spec.mean, spec.std
        self.stages = probe_stages(extractor)  # (channels, stride) of each stage


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (shapes, dtypes and values, in registration order; not their names),
    as loaded: an artifact records it, so a model is never scored with other weights than it was fitted
    with (a replaced `--weights` file, another package version)."""
    h = hashlib.sha256()
    for tensor in module.state_dict().values():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_backbones: weakref.WeakValueDictionary[tuple, Backbone] = weakref.WeakValueDictionary()
_backbones_lock = threading.Lock()


def shared_backbone(name: str, layers: tuple[str, ...] | None, weights: str | Path | None,
                    device: torch.device) -> Backbone:
    """One backbone per (name, layers, weights, device) in the process, shared by every model using it
    (inference only, so sharing between threads is safe); freed with the last model that uses it."""
    source: tuple | None = None
    if weights is not None:
        try:  # a replaced weights file is another backbone
            stat = os.stat(weights)
            source = (str(Path(weights).resolve()), stat.st_size, stat.st_mtime_ns)
        except OSError:
            source = (str(weights),)  # load_extractor reports the problem
    key = (name, tuple(layers or get_spec(name).default_layers), source, str(device))
    with _backbones_lock:
        backbone = _backbones.get(key)
        if backbone is None:
            backbone = Backbone(name, layers, weights, device)
            _backbones[key] = backbone
        return backbone


_pinned: list[Backbone] = []


def pin_backbone(name: str, device: torch.device) -> Backbone:
    """Build (or find) the backbone `name` with its default stages and keep it for the life of the
    process: a worker calls this when it starts, so its first model load does not build the network."""
    backbone = shared_backbone(name, None, None, device)
    with _backbones_lock:
        if all(b is not backbone for b in _pinned):
            _pinned.append(backbone)
    return backbone
