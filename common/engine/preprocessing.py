"""Image -> normalised input tensor, keeping track of where the model's input lies in the image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from common.engine.config import PatchCoreConfig

GRID = 16  # input sides are multiples of the deepest stride, so the two feature grids align exactly
# A model input has at most this many times image_size**2 pixels. Only resize="scale" can exceed
# image_size**2 (an image larger than the training images): far larger, one image's activations would take
# gigabytes, so it fails alone with the reason instead of taking the worker's memory.
MAX_INPUT_AREA = 16


@dataclass(frozen=True)
class Geometry:
    """Where the model input comes from: the crop box (in original pixels) and the input size."""

    orig_hw: tuple[int, int]
    box: tuple[int, int, int, int]  # top, left, height, width of the region the model sees
    input_hw: tuple[int, int]


def resolve_resize(config: PatchCoreConfig, sizes: Sequence[tuple[int, int]]) -> PatchCoreConfig:
    """`config` with resize="auto" made concrete for training images of these (height, width) sizes.

    Images of one size (a fixed camera): keep_aspect, the whole field of view at an area of
    image_size**2. Images of varying sizes (crops, tiles of different extent): scale, one factor for all,
    so a texture keeps its pixel size from image to image (keep_aspect would zoom each tile differently);
    the factor brings the largest training image to an area of image_size**2, which bounds the compute
    per image. Other modes are returned unchanged.
    """
    if config.resize != "auto":
        return config
    if len(set(sizes)) <= 1:  # none readable: the fit reports why, image by image
        return replace(config, resize="keep_aspect")
    largest = max(h * w for h, w in sizes)
    factor = min(4.0, round(config.image_size / math.sqrt(largest), 4))
    return replace(config, resize="scale", scale=factor)


def resolve_bit_depth(config: PatchCoreConfig, bits: Sequence[int]) -> PatchCoreConfig:
    """`config` with bit_depth=0 (auto) made concrete from `common.images.bits_used` of the training
    images stored with more than 8 bits a sample: the most any of them uses, at least 8, so every image of
    the product is scaled alike (brightness stays comparable) and a Mono12 camera's values fill 8 bits.
    Left at 0 (the container's full range) when no training image has more than 8 bits a sample."""
    if config.bit_depth != 0 or not bits:
        return config
    return replace(config, bit_depth=min(16, max(8, max(bits))))


def resized_hw(h: int, w: int, config: PatchCoreConfig) -> tuple[int, int]:
    """Size the whole image is resized to (before any center crop)."""
    # resize="auto" is resolved by fit(); a bank built otherwise (extract + set_bank) means keep_aspect
    if config.resize == "square":
        return config.image_size, config.image_size
    if config.resize == "scale":  # same physical pixel size for every image, whatever its extent
        return (max(GRID, round(h * config.scale / GRID) * GRID),
                max(GRID, round(w * config.scale / GRID) * GRID))
    # keep_aspect: the input area is image_size**2, whatever the aspect ratio, so small tiles gain
    # resolution, big images lose none of their field of view, and compute per image is constant.
    scale = config.image_size / math.sqrt(h * w)
    return max(GRID, round(h * scale / GRID) * GRID), max(GRID, round(w * scale / GRID) * GRID)


def input_limit(config: PatchCoreConfig) -> int:
    """Most pixels a model input may have (MAX_INPUT_AREA x image_size**2)."""
    return MAX_INPUT_AREA * config.image_size**2


def geometry(h: int, w: int, config: PatchCoreConfig) -> Geometry:
    """Where the model input lies in an (h, w) image; ValueError if the input would exceed `input_limit`."""
    rh, rw = resized_hw(h, w, config)
    if rh * rw > input_limit(config):
        raise ValueError(f"image is {w}x{h} pixels: at scale {config.scale:g} its model input would be {rw}x{rh}, "
                         f"above the limit of {input_limit(config):,} pixels ({MAX_INPUT_AREA} x image_size "
                         f"{config.image_size} squared), far larger than the training images; crop it like "
                         "them, or refit with a larger --image-size")
    if config.center_crop is None:
        return Geometry((h, w), (0, 0, h, w), (rh, rw))
    c = config.center_crop
    top, left = (rh - c) // 2, (rw - c) // 2
    sy, sx = h / rh, w / rw  # crop box mapped back to original pixels, at least one pixel of the image
    bh, bw = max(1, round(c * sy)), max(1, round(c * sx))
    box = (min(round(top * sy), h - bh), min(round(left * sx), w - bw), bh, bw)
    return Geometry((h, w), box, (c, c))


def to_input(image: np.ndarray, config: PatchCoreConfig, mean: tuple[float, ...], std: tuple[float, ...],
             full_hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, Geometry]:
    """(H, W, 3) uint8 RGB -> (3, h, w) float32 normalised tensor and its geometry.

    `full_hw`: the image's own size when `image` was decoded at a reduced scale (at least the input
    size, see `common.images.decode_image`); the geometry, and so maps and masks, refer to it."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    geo = geometry(*(full_hw or (h, w)), config)
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image)  # torch wants writable memory; decoded PIL arrays are read-only
    # Resized while still uint8 and channels-last (an (H, W, 3) array seen as (1, 3, H, W)): torch's
    # vectorised uint8 antialiased bilinear kernel, several times faster than the float path and within
    # one grey level of it; the float conversion then runs on the (usually smaller) resized image.
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    rh, rw = resized_hw(*geo.orig_hw, config)
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    x = x[0]
    if config.center_crop is not None:
        c = config.center_crop
        top, left = (rh - c) // 2, (rw - c) // 2
        x = x[:, top: top + c, left: left + c]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None] * 255.0
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None] * 255.0
    return x.float().sub_(m).div_(s).contiguous(), geo
