"""Generated inspection images with planted defects and their masks (demo, tests, benchmarks).

A "part" is a brushed-metal texture with a machined ring; a defect is a scratch (thin dark line) or
a stain (bright blob) at a random place. Everything is deterministic for a seed and needs no download.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.images import png_bytes


def nominal_image(seed: int, size: int = 192) -> np.ndarray:
    """(size, size, 3) uint8 image of a defect-free part."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grain = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=(0.6, 6.0))  # brushed texture
    grain = grain / (grain.std() + 1e-6)
    cy, cx = size / 2 + rng.normal(0, 1.5), size / 2 + rng.normal(0, 1.5)
    r = np.hypot(yy - cy, xx - cx)
    ring = np.exp(-((r - size * 0.3) ** 2) / (2 * (size * 0.03) ** 2))
    base = 120 + 8 * grain + 60 * ring + rng.normal(0, 2, size=(size, size))
    tint = np.array([1.0, 0.97, 0.92], dtype=np.float32) * (1 + rng.normal(0, 0.01))
    return np.clip(base[..., None] * tint, 0, 255).astype(np.uint8)


def blob_mask(h: int, w: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """(h, w) bool: the disk of `radius` pixels around `center` (row, column)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.hypot(yy - center[0], xx - center[1]) <= radius


def plant_defect(image: np.ndarray, seed: int, kind: str | None = None,
                 center: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Copy of `image` with a scratch or stain, and its boolean mask."""
    rng = np.random.default_rng(seed + 10_000)
    h, w = image.shape[:2]
    kind = kind or ("scratch" if rng.random() < 0.5 else "stain")
    cy, cx = center or (int(rng.integers(h // 6, 5 * h // 6)), int(rng.integers(w // 6, 5 * w // 6)))
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.3) * min(h, w)
        dy, dx = np.sin(angle), np.cos(angle)
        along = (yy - cy) * dy + (xx - cx) * dx
        across = -(yy - cy) * dx + (xx - cx) * dy
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= max(1.0, min(h, w) / 120))
        delta = -70.0
    elif kind == "stain":
        radius = rng.uniform(0.03, 0.06) * min(h, w)
        mask = np.hypot(yy - cy, xx - cx) <= radius
        delta = 60.0
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    out = image.astype(np.float32)
    out[mask] += delta
    return np.clip(out, 0, 255).astype(np.uint8), mask


def mask_png_bytes(mask: np.ndarray) -> bytes:
    return png_bytes(mask.astype(np.uint8) * 255)


def encoded_parts(n: int, size: int, seed: int, defect_every: int = 4) -> list[bytes]:
    """PNG bytes of `n` parts (seeds seed, seed + 1 ...); every `defect_every`-th has a planted defect."""
    out = []
    for i in range(n):
        image = nominal_image(seed + i, size)
        if defect_every and i % defect_every == defect_every - 1:
            image, _ = plant_defect(image, seed + i)
        out.append(png_bytes(image))
    return out
