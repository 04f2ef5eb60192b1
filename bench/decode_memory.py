"""Peak memory of decoding large images, per image mode and with several decoding threads.

    python bench/decode_memory.py [--side 6000] [--threads 8]

Each measurement runs in a fresh Python process and reports the rise of its peak RSS while decoding,
in bytes per pixel of the image (the images are `--side` x `--side`, above the default 4096-pixel side
limit, so they are also reduced). The threaded run decodes `--threads` RGBA images at once, as a chunk's
loaders or a fit's survey would; `common.images.PixelBudget` lets only as many decode at once as fit in
TOTALRECALL_MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("L", "RGB", "RGBA", "LA", "P", "P+transparency", "1", "I;16", "RGB48")


def make_image(mode: str, side: int, path: Path) -> None:
    """A `side` x `side` PNG of `mode` with random content (few distinct values, so it compresses)."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 8, (side, side, 4), np.uint8) * 30
    if mode in ("L", "RGB", "RGBA", "LA"):
        channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
        Image.fromarray(levels[..., :channels].squeeze(), mode).save(path)
    elif mode in ("P", "P+transparency"):
        palette = Image.fromarray(levels[..., 0]).convert("P")
        palette.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    elif mode == "1":
        Image.fromarray(levels[..., 0] > 100).save(path)
    elif mode == "I;16":
        Image.fromarray(levels[..., 0].astype(np.uint16) * 257).save(path)
    elif mode == "RGB48":
        import imagecodecs

        path.write_bytes(imagecodecs.png_encode(levels[..., :3].astype(np.uint16) * 257))


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak, VmHWM at its own exec
_MEASURE = """
import re, sys
from concurrent.futures import ThreadPoolExecutor
from common.images import decode_image
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
data = [open(p, "rb").read() for p in sys.argv[1:]]
before = status("VmRSS")
with ThreadPoolExecutor(len(data)) as pool:
    list(pool.map(decode_image, data))
print(status("VmHWM") - before)
"""


def peak_rise(paths: list[Path]) -> int:
    """Rise of the peak RSS, in bytes, of a fresh process decoding `paths` at once."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, paths)], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    pixels = args.side**2
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            path = Path(tmp) / f"{mode.replace(';', '_').replace('+', '_')}.png"
            make_image(mode, args.side, path)
            results[mode] = round(peak_rise([path]) / pixels, 1)
            print(f"{mode:>16}: {results[mode]:5.1f} bytes a pixel", flush=True)
            if mode != "RGBA":
                path.unlink()
        rgba = Path(tmp) / "RGBA.png"
        copies = [rgba] * args.threads
        together = peak_rise(copies)
        results[f"{args.threads} x RGBA at once"] = round(together / pixels, 1)
        print(f"{args.threads} RGBA images in {args.threads} threads: {together / 2**20:,.0f} MiB, "
              f"{together / pixels:.1f} bytes a pixel of one image", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
