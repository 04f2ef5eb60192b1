"""What scoring writes per image besides its database row: a mask PNG and a heatmap PNG, and their keys.

Layout: `results/<product>/<model version>/<captured date or job-<id>>/<image key>_{mask,heatmap}.png`,
where the image key is the image's path below the job's images folder with each segment made safe (and a
short hash of the original appended when that changed anything, so two images never share a file).
Both PNGs have the size of the original (EXIF-rotated) image, so they overlay it directly; an image
with a side over `TOTALRECALL_MAX_IMAGE_SIDE` is inspected at its reduced size, and its PNGs and the
result's max_y/max_x are in that reduced frame (scale them by the original's longer side / that limit).
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from common.engine.patchcore import ImageResult
from common.images import png_bytes
from common.storage import split_uri

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
ROWS = 256  # rows per block when scaling a heatmap
# zlib level of heatmaps: level 3 encodes a 900 x 900 map in half the time of Pillow's default 6, for
# files about a quarter larger (masks are nearly all zeros and stay at the default)
HEATMAP_COMPRESS_LEVEL = 3


def relative_image_key(image_uri: str, images_uri: str | None) -> str:
    """The image's path below `images_uri` (the folder the job listed), else its key in its store."""
    if images_uri:
        prefix = images_uri.rstrip("/") + "/"
        if image_uri.startswith(prefix) and len(image_uri) > len(prefix):
            return image_uri[len(prefix):]
    return split_uri(image_uri)[1]


MAX_SEGMENT = 200  # characters of one path segment: with the hash and `_heatmap.png`, within 255 bytes
MAX_IMAGE_KEY = 700  # characters of the whole image key: with `results/...` and the suffixes, within S3's 1024


def safe_key(key: str) -> str:
    """`key` with characters outside [A-Za-z0-9._-] replaced in every segment, and segments cut to
    `MAX_SEGMENT` characters (file systems allow 255 bytes a name), the folders replaced by a hash beyond
    `MAX_IMAGE_KEY` characters in all; unique per input key."""
    segments = [_UNSAFE.sub("_", s)[:MAX_SEGMENT] or "_" for s in key.strip("/").split("/")]
    segments = ["_" if s in (".", "..") else s for s in segments]
    safe = "/".join(segments)
    if len(safe) > MAX_IMAGE_KEY:  # deep folders: their path gives way to a hash (an S3 key has 1024 bytes)
        safe = hashlib.sha1(key.encode()).hexdigest()[:16] + "/" + segments[-1]
    if safe != key:
        safe += "~" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return safe


def output_keys(product: str, version: int, folder: str, image_uri: str,
                images_uri: str | None) -> tuple[str, str]:
    """(mask key, heatmap key) for one image, relative to the storage root."""
    base = f"results/{product}/{version}/{folder}/{safe_key(relative_image_key(image_uri, images_uri))}"
    return f"{base}_mask.png", f"{base}_heatmap.png"


def _full_size(values: np.ndarray, result: ImageResult) -> np.ndarray:
    """`values` (over the result's box) placed on a zero canvas of the original image's size."""
    if result.image_hw is None or result.box is None:
        return values
    canvas = np.zeros(result.image_hw, dtype=values.dtype)
    top, left, height, width = result.box
    canvas[top:top + height, left:left + width] = values
    return canvas


def mask_png(result: ImageResult) -> bytes:
    """The defect mask as a PNG: 255 where the anomaly map reaches the pixel threshold, 0 elsewhere."""
    grey = result.mask.astype(np.uint8)
    grey *= 255
    return png_bytes(_full_size(grey, result))


def heatmap_png(result: ImageResult, pixel_threshold: float) -> bytes:
    """The anomaly map as 8-bit grey: 128 at the pixel threshold, linear, clipped at 255.

    Scaling by the model's threshold rather than by each map's maximum keeps heatmaps comparable across
    images: a nominal image stays dark instead of having its noise stretched to full brightness.
    """
    amap = result.anomaly_map
    scale = pixel_threshold if math.isfinite(pixel_threshold) and pixel_threshold > 0 else float(amap.max())
    factor = np.float32(128.0 / max(scale, 1e-12))
    grey = np.empty(amap.shape, dtype=np.uint8)
    for top in range(0, amap.shape[0], ROWS):  # in row blocks: no full-size float temporaries
        block = amap[top:top + ROWS] * factor
        np.clip(block, 0, 255, out=block)
        grey[top:top + ROWS] = block
    return png_bytes(_full_size(grey, result), HEATMAP_COMPRESS_LEVEL)
