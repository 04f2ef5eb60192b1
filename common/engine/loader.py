"""Decode and preprocess images on background threads while the model computes, and batch them.

Consecutive images with the same input size go into one batch (keep_aspect inputs may differ in size).
Per-image failures are yielded as `Failed` items rather than raised, so one bad image never stops a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.engine.config import PatchCoreConfig
from common.engine.preprocessing import Geometry, resized_hw, to_input
from common.images import bits_used, decode_for, decode_image, decoded_size

ImageSource = np.ndarray | str | Path | bytes | Callable[[], Any]

# What reading or decoding one image may raise (missing object, over the size limit, unreadable or
# corrupt file): that image fails and is reported, the others go on. Anything else (a storage service
# that is down) propagates.
IMAGE_ERRORS = (ValueError, OSError, KeyError)


@dataclass
class Batch:
    positions: list[int]  # positions of the images in the caller's sequence
    tensor: torch.Tensor  # (B, 3, h, w)
    geometries: list[Geometry]


@dataclass
class Failed:
    position: int
    error: str


def load_rgb(source: ImageSource, config: PatchCoreConfig | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The RGB array of an image and the image's own (height, width).

    With a config, a JPEG is decoded only as large as the model's input for it (`decode_for`): a
    5-megapixel photo is then decoded at 1/4 scale, the array is smaller than the image, and the size
    returned is the image's, which maps and masks keep. The header is read once for both. Images of
    more than 8 bits a sample, grey or colour, are scaled from the config's `bit_depth`."""
    if callable(source):
        source = source()
    if isinstance(source, np.ndarray):
        return source, (int(source.shape[0]), int(source.shape[1]))
    if config is None:
        image = decode_image(source)
        return image, (int(image.shape[0]), int(image.shape[1]))
    return decode_for(source, lambda h, w: resized_hw(h, w, config), config.bit_depth)


def source_sizes(images: Sequence[ImageSource], threads: int = 8) -> list[tuple[int, int]]:
    """(height, width) of every readable image, from headers (a loader is called, i.e. downloaded,
    once for this); unreadable ones are left out: they fail again, and are reported, when decoded.

    The largest size sets an `auto` input scale, so the largest images are decoded too, largest first,
    until one decodes: a file whose header reads but whose pixels do not (a truncated upload of a large
    image) would otherwise shrink every image of the model, while it fails itself."""
    sizes = _survey(images, _size_or_none, threads, keep_none=True)
    for pos in sorted(range(len(sizes)), key=lambda i: -(sizes[i][0] * sizes[i][1]) if sizes[i] else 0):
        if sizes[pos] is None or len({s for s in sizes if s is not None}) <= 1:
            break
        try:
            load_rgb(images[pos])
            break
        except IMAGE_ERRORS:
            sizes[pos] = None  # fails again, and is reported, when the fit decodes it
    return [s for s in sizes if s is not None]


def _size_or_none(source: Any) -> tuple[int, int] | None:
    return (int(source.shape[0]), int(source.shape[1])) if isinstance(source, np.ndarray) else decoded_size(source)


def source_bits(images: Sequence[ImageSource], threads: int = 8) -> list[int]:
    """`common.images.bits_used` of every image stored with more than 8 bits a sample (arrays are 8-bit
    RGB already); the others are left out."""
    return _survey(images, lambda s: None if isinstance(s, np.ndarray) else bits_used(s), threads)


def _survey(images: Sequence[ImageSource], read: Callable[[Any], Any], threads: int,
            keep_none: bool = False) -> list:
    """`read` of every image (a loader is called for it), in parallel; None results and images that
    cannot be read are left out (with `keep_none`, None in their place)."""
    def one(source: ImageSource) -> Any:
        try:
            return read(source() if callable(source) else source)
        except IMAGE_ERRORS:
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, images))
    return results if keep_none else [r for r in results if r is not None]


def iter_batches(images: Sequence[ImageSource], config: PatchCoreConfig, mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int, threads: int = 2,
                 prefetch: int = 16) -> Iterator[Batch | Failed]:
    def prepare(pos: int) -> tuple[int, torch.Tensor | None, Geometry | None, str | None]:
        try:
            image, full_hw = load_rgb(images[pos], config)
            x, geo = to_input(image, config, mean, std, full_hw)
            return pos, x, geo, None
        except IMAGE_ERRORS as exc:  # ImageDecodeError is a ValueError
            return pos, None, None, f"{exc.__class__.__name__}: {exc}"

    pending: list[tuple[int, torch.Tensor, Geometry]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for pos, x, geo, err in _bounded_map(pool, prepare, range(len(images)), prefetch):
            if err is not None:
                yield Failed(pos, err)
                continue
            if pending and (x.shape != pending[0][1].shape or len(pending) == _fitting(batch_size, x, config)):
                yield _collate(pending)
                pending = []
            pending.append((pos, x, geo))
        if pending:
            yield _collate(pending)


def _fitting(batch_size: int, x: torch.Tensor, config: PatchCoreConfig) -> int:
    """Inputs of x's size in one batch: `batch_size`; under resize="scale", fewer for inputs larger than
    image_size**2 (images larger than the training images), so that such a batch never holds more pixels
    than batch_size x image_size**2. (The other modes' inputs are about image_size**2 by construction.)"""
    if config.resize != "scale":
        return batch_size
    return max(1, min(batch_size, batch_size * config.image_size**2 // (x.shape[-2] * x.shape[-1])))


def _collate(items: list[tuple[int, torch.Tensor, Geometry]]) -> Batch:
    return Batch([p for p, _, _ in items], torch.stack([x for _, x, _ in items]), [g for _, _, g in items])


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """pool.map that keeps at most `ahead` results in flight (bounded memory), in order."""
    futures: list = []
    for item in items:
        futures.append(pool.submit(fn, item))
        if len(futures) > ahead:
            yield futures.pop(0).result()
    for f in futures:
        yield f.result()
