"""Synthetic inspection images for engine tests: a striped, slightly noisy texture (nominal images differ
by stripe phase and noise) and defects planted at a known place (a bright scratch, a dark blob)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from PIL import Image

from common.synthetic import blob_mask  # noqa: F401 - one disk for tests and benchmarks


def texture(rng: np.random.Generator, h: int = 128, w: int = 128) -> np.ndarray:
    """(h, w, 3) uint8 nominal image: diagonal stripes with a random phase, smooth and fine noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    period = 12.0 + rng.uniform(-0.5, 0.5)
    stripes = 35.0 * np.sin(2 * np.pi * (xx + 0.5 * yy) / period + phase)
    smooth = ndi.gaussian_filter(rng.standard_normal((h, w)), 6.0) * 60.0
    fine = rng.standard_normal((h, w)) * 3.0
    gray = 120.0 + stripes + smooth + fine
    rgb = np.stack([gray, gray * 0.9 + 10, gray * 0.8 + 20], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def scratch_mask(h: int, w: int, start: tuple[float, float], end: tuple[float, float],
                 thickness: float = 2.0) -> np.ndarray:
    """Boolean mask of a straight line segment from start (y, x) to end (y, x)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    p0, p1 = np.array(start, dtype=np.float64), np.array(end, dtype=np.float64)
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / float(d @ d), 0.0, 1.0)
    dist = np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
    return dist <= thickness


def plant(image: np.ndarray, mask: np.ndarray, value: int) -> np.ndarray:
    out = image.copy()
    out[mask] = value
    return out


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)).save(buf, "PNG")
    return buf.getvalue()


def mono12_png(gray: np.ndarray, add: np.ndarray | float = 0.0) -> bytes:
    """A 16-bit grey PNG as a Mono12 camera writes one: the 8-bit `gray` (plus `add`, in 12-bit levels)
    on the scale 0..4095, the upper four bits of each 16-bit sample unused."""
    twelve = np.clip(gray.astype(np.float64) * 4095 / 255 + add, 0, 4095).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(twelve).save(buf, "PNG")
    return buf.getvalue()


def camera_colour(rgb: np.ndarray, fmt: str, bits: int = 12, alpha: np.ndarray | None = None,
                  orientation: int | None = None) -> bytes:
    """A colour PNG or TIFF as a `bits`-bit colour camera writes one: the 8-bit `rgb` on the scale
    0..2**bits-1, in 16-bit samples (RGB48, or RGBA64 with a 16-bit `alpha`) unless `bits` is 8.
    `orientation`: a TIFF orientation tag."""
    import imagecodecs
    import tifffile

    scaled = np.round(rgb.astype(np.float64) * (2**bits - 1) / 255)
    samples = scaled.astype(np.uint8 if bits == 8 else np.uint16)
    if alpha is not None:
        samples = np.dstack([samples, alpha.astype(samples.dtype)])
    if fmt == "png":
        assert orientation is None, "PNG orientation needs an eXIf chunk; not written here"
        return imagecodecs.png_encode(samples)
    buf = io.BytesIO()
    tifffile.imwrite(buf, samples, photometric="rgb", extrasamples=("unassalpha",) if alpha is not None else (),
                     extratags=[(0x0112, "H", 1, orientation, True)] if orientation else [])
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def one_bit_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of any declared size; a huge one compresses to a few hundred KB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def make_mvtec(root: Path, category: str = "synth", n_train: int = 8, seed: int = 0) -> dict:
    """A tiny MVTec-AD-layout dataset: train/good, test/good (one of them a JPEG), test/scratch with
    ground_truth masks, and one scratch image without a mask file. Returns what was written."""
    rng = np.random.default_rng(seed)
    base = root / category
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(texture(rng)).save(base / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(texture(rng)).save(base / "test/good" / f"{i:03d}.png")
    Image.fromarray(texture(rng)).save(base / "test/good" / "003.jpg", quality=95)
    segments = [((30, 20), (40, 90)), ((90, 30), (60, 100)), ((20, 100), (100, 110)), ((64, 10), (70, 60))]
    for i, (a, b) in enumerate(segments):
        mask = scratch_mask(128, 128, a, b)
        Image.fromarray(plant(texture(rng), mask, 255)).save(base / "test/scratch" / f"{i:03d}.png")
        if i < 3:  # the last defect image has no mask file
            Image.fromarray((mask * 255).astype(np.uint8)).save(base / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return {"root": root, "category": category, "n_train": n_train, "n_good": 4, "n_defect": len(segments)}
