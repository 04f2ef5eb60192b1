"""Safe image decoding: any mode, any size, bounded memory, clear errors.

Every image that enters TotalRecall goes through `decode_image`, so the rules live in one place:
EXIF orientation is applied as a viewer would, 16-bit and palette/CMYK/alpha modes are converted to
8-bit RGB (images of more than 8 bits a sample, grey or colour, from their significant bits, `bit_depth`:
a Mono12 camera's 16-bit files hold 0..4095, which the full 16-bit range would squeeze into 16 grey
levels; `bits_used` tells how many a file needs), decompression bombs are refused from the header alone,
and very large images are reduced while decoding (JPEG draft mode) and then resized so a batch's memory
stays bounded. Pillow reads every header and decodes every format, except the pixels of plain 8-bit
grey or RGB PNGs, which libpng decodes (through imagecodecs) to the same values at about 1.6x the speed,
and those of 16-bit colour PNGs and TIFFs, which Pillow would cut to their upper 8 bits (libpng and
libtiff through imagecodecs keep all 16).

Limits come from the settings: `TOTALRECALL_MAX_IMAGE_PIXELS` (refused above it, from the header) and
`TOTALRECALL_MAX_IMAGE_SIDE` (longer side after decoding). A PNG must be decoded whole (a JPEG is
decoded at a reduced scale): one decode's peak is about 5 bytes a pixel for grey, 9 for colour, palette
and 1-bit images, 13 with transparency, more for 16-bit colour (`bench/decode_memory.py`,
docs/benchmarks.md section 4). The threads of a process decode at most MAX_IMAGE_PIXELS pixels at once
(`PixelBudget`), so all of them together need no more than one image at the limit.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, NamedTuple

import imagecodecs
import numpy as np
from PIL import Image, UnidentifiedImageError

from common.memory import release_memory
from common.settings import get_settings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LARGE_DECODE = 8_000_000  # pixels: after decoding an image this large, freed memory goes back to the OS
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of integer samples wider than 8 bits
# What else a decoder plugin may raise on a malformed file (beyond OSError, SyntaxError and ValueError):
# the image is unreadable, and fails alone, instead of the batch it is in
DECODER_FAULTS = (RuntimeError, TypeError, IndexError, KeyError, AttributeError, ZeroDivisionError, EOFError,
                  struct.error, MemoryError, OverflowError)
# EXIF orientation -> the transposition that shows the stored image as a viewer does (as ImageOps.exif_transpose)
_SHOWN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


def decode_image(source: bytes | str | Path, max_side: int | None = None,
                 at_least: tuple[int, int] | None = None, bit_depth: int = 0) -> np.ndarray:
    """Decode an image to an (H, W, 3) uint8 RGB array, oriented as a viewer shows it.

    `at_least` (height, width, as shown) says the caller needs no more pixels than that (it resizes the
    image to that size or smaller): a JPEG is then decoded at 1/2, 1/4 or 1/8 scale (the DCT's own
    downscaling, several times cheaper than a full decode) as long as the result stays at least that
    large, and the array is smaller than `decoded_size(source)`, which stays the image's size.
    `bit_depth` (8..16; 0: the container's full range) is the significant bits of an image stored with
    more than 8 bits a sample, grey or colour: 0..2**bit_depth-1 becomes 0..255, larger values 255 (an
    alpha channel is read from its full range).
    """
    return _decode(source, max_side, None if at_least is None else lambda h, w: at_least, bit_depth)[0]


def decode_for(source: bytes | str | Path, needed: Callable[[int, int], tuple[int, int]],
               bit_depth: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image` with `at_least = needed(*size)` for the image's own size, and that size
    (`decoded_size`), from one reading of the header."""
    return _decode(source, None, needed, bit_depth)


def _decode(source: bytes | str | Path, max_side: int | None, needed: Callable[[int, int], tuple[int, int]] | None,
            bit_depth: int) -> tuple[np.ndarray, tuple[int, int]]:
    settings = get_settings()
    max_pixels, max_side = _pillow_limit(), max_side or settings.max_image_side
    data = Path(source).read_bytes() if isinstance(source, str | Path) else source
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    with contextlib.ExitStack() as decoding:  # holds this image's share of the process's pixel budget
        try:
            with open_image(data) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                        f"{max_pixels:,} (TOTALRECALL_MAX_IMAGE_PIXELS); refused without decoding"
                    )
                orientation = _orientation(img)
                shown = _shown_size(img.size, orientation, max_side)
                if _is_plain_png(img, max_side, orientation):
                    _check_inspectable(width, height)
                    decoding.enter_context(DECODING.hold(width * height, max_pixels))
                    return _decode_plain_png(data), shown
                if img.format == "JPEG":
                    request = _draft_request(img, orientation, max_side, needed and needed(*shown))
                    if request is not None:
                        img.draft("RGB", request)  # img.size is now the reduced scale's
                decoding.enter_context(DECODING.hold(img.size[0] * img.size[1], max_pixels))
                if _is_high_bit_colour(img):  # decoded as stored, so its orientation is ours to apply
                    orientation = _stored_orientation(img)
                    img = _high_bit_colour_to_8_bits(img, data, bit_depth)
                img.load()
                img = _reduce(img, max_side)
                if orientation in _SHOWN:
                    img = img.transpose(_SHOWN[orientation])
                if img.mode in HIGH_BIT_MODES:
                    img = _high_bit_grey_to_8_bits(img, bit_depth)
                if img.mode in ("L", "RGB"):  # grey is resized before it becomes RGB: a quarter of the bytes
                    img = _fit_side(img, max_side)
                rgb = _to_rgb(img)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's check, at twice our limit, before ours could run
            raise ImageDecodeError(f"image above the limit of {max_pixels:,} pixels (TOTALRECALL_MAX_IMAGE_PIXELS); "
                                   f"refused without decoding ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise ImageDecodeError("not a recognised image format") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
        except DECODER_FAULTS as exc:  # a decoder plugin's own failure (e.g. AVIF's RuntimeError): this image's
            raise ImageDecodeError(f"could not decode the image: {type(exc).__name__}: {exc}") from exc
        if min(_side_limited(rgb.size, max_side)) < 8 <= min(width, height):  # as it will be: any mode alike
            small = "x".join(map(str, _side_limited((width, height), max_side)))
            raise ImageDecodeError(f"image is {width}x{height} pixels: at most {max_side} pixels a side "
                                   f"(TOTALRECALL_MAX_IMAGE_SIDE) it would be {small}, too small to inspect")
        _check_inspectable(*rgb.size)
        pixels = np.asarray(_fit_side(rgb, max_side))
        del img, rgb  # freed before this image's budget is given back
        if width * height >= LARGE_DECODE:
            release_memory()  # or each decoding thread's glibc arena keeps its own copy of the peak
        return pixels, shown


def _fit_side(img: Image.Image, max_side: int) -> Image.Image:
    """`img` resized so that its longer side is at most `max_side` (unchanged if it is)."""
    if max(img.size) <= max_side:
        return img
    return img.resize(_side_limited(img.size, max_side), Image.Resampling.BILINEAR, reducing_gap=3.0)


class PixelBudget:
    """How many pixels this process decodes at once: at most `limit` (TOTALRECALL_MAX_IMAGE_PIXELS), so the
    decoding threads of a worker (a chunk's loaders, a fit's survey) together need no more memory than one
    image at the limit. Images are admitted in the order they ask, so a large one is not starved by small
    ones; one larger than the limit is admitted alone."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_use = 0
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextlib.contextmanager
    def hold(self, pixels: int, limit: int) -> Iterator[None]:
        pixels = max(0, min(pixels, limit))
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                self._changed.wait_for(lambda: ticket == self._serving
                                       and (self._in_use == 0 or self._in_use + pixels <= limit))
            except BaseException:  # interrupted while waiting: give the turn up, or the queue would stall
                if ticket == self._serving:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                self._changed.notify_all()
                raise
            self._in_use += pixels
            self._advance()
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= pixels
                self._changed.notify_all()

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1


DECODING = PixelBudget()


def _pillow_limit() -> int:
    """TOTALRECALL_MAX_IMAGE_PIXELS, also made Pillow's own bomb check (it refuses above twice it) before
    any header is read, so the training images' survey and decoding see the same images."""
    max_pixels = get_settings().max_image_pixels
    Image.MAX_IMAGE_PIXELS = max_pixels
    return max_pixels


def _check_inspectable(width: int, height: int) -> None:
    if min(width, height) < 8:
        raise ImageDecodeError(f"image is {width}x{height} pixels, too small to inspect")


def _is_plain_png(img: Image.Image, max_side: int, orientation: int | None) -> bool:
    """A non-interlaced 8-bit grey or RGB PNG without transparency or orientation, within the side limit:
    the usual archive image, whose pixels need no conversion."""
    header = _png_header(img)
    return (header is not None and header.bit_depth == 8 and header.colour_type in (0, 2)
            and not header.interlaced and "transparency" not in img.info and max(img.size) <= max_side
            and orientation in (None, 1))


def _decode_plain_png(data: bytes) -> np.ndarray:
    """Pixels of a plain PNG (`_is_plain_png`) as (H, W, 3) uint8, by libpng (imagecodecs):
    the same values as Pillow's decoder at about 1.6x its speed, and without holding the GIL, so the loader
    threads decode while the model computes."""
    try:
        pixels = imagecodecs.png_decode(data)
    except imagecodecs.PngError as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def _is_high_bit_colour(img: Image.Image) -> bool:
    """A PNG or TIFF of 16-bit unsigned samples with colour or alpha (RGB48, RGBA64, grey + alpha), which
    Pillow would decode to 8-bit modes by dropping the lower 8 bits of each sample. Header only."""
    if img.format == "PNG":
        header = _png_header(img)  # colour types 2 RGB, 4 grey + alpha, 6 RGBA
        return header is not None and header.bit_depth == 16 and header.colour_type in (2, 4, 6)
    if img.format == "TIFF":
        bits, formats = img.tag_v2.get(258, ()), img.tag_v2.get(339, (1,))  # BitsPerSample, SampleFormat
        bits, formats = (b if isinstance(b, tuple) else (b,) for b in (bits, formats))
        return len(bits) >= 2 and set(bits) == {16} and set(formats) == {1}
    return False


def _high_bit_pixels(img: Image.Image, data: bytes) -> np.ndarray:
    """(H, W, C) uint16 samples of an `_is_high_bit_colour` image, by libpng or libtiff (imagecodecs)."""
    decode = imagecodecs.png_decode if img.format == "PNG" else imagecodecs.tiff_decode  # TIFF: its first page
    try:
        pixels = decode(data)
    except (imagecodecs.PngError, imagecodecs.TiffError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
    width, height = _stored_size(img)
    if pixels.ndim == 3 and pixels.shape[1:] == (height, width) and pixels.shape[0] in (2, 3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # a TIFF of planar (channel after channel) samples
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[:2] != (height, width) \
            or pixels.shape[2] not in (2, 3, 4):
        raise ImageDecodeError(f"unsupported 16-bit image layout: {pixels.shape} {pixels.dtype} for a "
                               f"{width}x{height} {img.mode} image")
    return pixels


def _colour_channels(pixels: np.ndarray) -> int:
    """How many of the last axis's channels are camera data: all but an alpha (grey + alpha, RGBA)."""
    return pixels.shape[2] - (pixels.shape[2] in (2, 4))


def _high_bit_colour_to_8_bits(img: Image.Image, data: bytes, bit_depth: int) -> Image.Image:
    """An `_is_high_bit_colour` image as an 8-bit LA, RGB or RGBA image: colour from `bit_depth` (0: the
    full 16 bits), alpha from its full range."""
    pixels = _high_bit_pixels(img, data)
    colour = _colour_channels(pixels)
    out = np.empty(pixels.shape, np.uint8)
    out[..., :colour] = _to_8_bits(pixels[..., :colour], float(2**bit_depth - 1) if bit_depth else 65535.0)
    out[..., colour:] = _to_8_bits(pixels[..., colour:], 65535.0)
    del pixels  # before Pillow's copy: peak 9 bytes a pixel (samples, then 8-bit values), not 13
    return Image.fromarray(out)


def _to_8_bits(samples: np.ndarray, top: float, rows: int = 512) -> np.ndarray:
    """0..top -> 0..255 (truncated; above `top` saturates), `rows` at a time so the float copy stays small."""
    out = np.empty(samples.shape, np.uint8)
    for start in range(0, samples.shape[0], rows):
        block = samples[start: start + rows].astype(np.float32)
        np.clip(block * np.float32(255.0 / top), 0, 255, out=block)
        out[start: start + rows] = block
    return out


def _draft_request(img: Image.Image, orientation: int | None, max_side: int,
                   at_least: tuple[int, int] | None) -> tuple[int, int] | None:
    """Smallest (width, height), as stored, that a JPEG's reduced-scale decoding must still reach; None:
    decode in full. Pillow's draft picks the largest of 1/2, 1/4, 1/8 that keeps both sides >= it."""
    width, height = img.size
    needs = []
    if max(width, height) > max_side:  # reduced to max_side later: at least half of it decoded
        scale = max_side / 2 / max(width, height)
        needs.append((max(1, int(width * scale)), max(1, int(height * scale))))
    if at_least is not None:
        h, w = at_least
        if _turned_a_quarter(orientation):  # the request is in stored orientation
            h, w = w, h
        needs.append((w, h))
    if not needs:
        return None
    return max(w for w, _ in needs), max(h for _, h in needs)


def _turned_a_quarter(orientation: int | None) -> bool:
    """Whether an EXIF orientation shows the image turned by 90 degrees (width and height swapped)."""
    return orientation in (5, 6, 7, 8)


def _shown_size(size: tuple[int, int], orientation: int | None, max_side: int) -> tuple[int, int]:
    """(height, width) of an image of stored (width, height) `size` as shown, reduced to `max_side`."""
    width, height = size
    if _turned_a_quarter(orientation):
        width, height = height, width
    width, height = _side_limited((width, height), max_side)
    return height, width


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation still to apply once Pillow has loaded the pixels (None or 1: shown as loaded),
    read without decoding pixels."""
    if img.format == "TIFF" and _pillow_orients_tiffs():
        return None  # its size is already the shown one, and load() turns the pixels
    return _stored_orientation(img)


def _stored_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag of the pixels as stored in the file (None or 1: shown as stored)."""
    if img.format == "TIFF":
        return img.tag_v2.get(0x0112)
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow's getexif() decodes a whole PNG to look for an eXIf chunk after the image data
        data = _png_chunk(img.fp, b"eXIf")
        if data is None:
            return None
        exif = Image.Exif()
        exif.load(data)
        return exif.get(0x0112)
    return img.getexif().get(0x0112)


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels as stored in the file."""
    width, height = img.size
    if img.format == "TIFF" and _pillow_orients_tiffs() and _turned_a_quarter(_stored_orientation(img)):
        return height, width
    return width, height


# Pillow opens EPS by running Ghostscript (where installed) on the file, without a time limit: a
# PostScript file named .png could hang a worker. No camera writes EPS, so it is not opened at all.
_EXTERNAL_PROGRAM_FORMATS = frozenset({"EPS"})


@lru_cache(maxsize=1)
def _raster_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in Image.OPEN if f not in _EXTERNAL_PROGRAM_FORMATS)


def open_image(source: bytes | str | Path) -> Image.Image:
    """`Image.open` of image bytes or a file, with every format Pillow decodes itself (not EPS)."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=_raster_formats())


@lru_cache(maxsize=1)
def _pillow_orients_tiffs() -> bool:
    """Whether this Pillow turns a TIFF as its orientation tag says when it loads it, reporting the shown
    size from the header, as Pillow 13 does (older releases left it to `ImageOps.exif_transpose`, and this
    code works with either)."""
    probe = io.BytesIO()
    Image.new("L", (2, 1)).save(probe, "TIFF", tiffinfo={0x0112: 6})
    with Image.open(probe) as img:
        return img.size == (1, 2)


class _PngHeader(NamedTuple):
    bit_depth: int
    colour_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA
    interlaced: bool


def _png_header(img: Image.Image) -> _PngHeader | None:
    """What a PNG's IHDR chunk says of its samples (None: not a PNG, or no complete IHDR)."""
    data = _png_chunk(img.fp, b"IHDR") if img.format == "PNG" else None
    if data is None or len(data) < 13:
        return None
    return _PngHeader(data[8], data[9], data[12] != 0)


def _png_chunk(fp: IO[bytes], kind: bytes) -> bytes | None:
    """Data of a PNG file's first `kind` chunk, found by skipping from chunk to chunk (nothing is inflated);
    None if absent or cut off. The file position is restored."""
    start = fp.tell()
    try:
        fp.seek(8)  # the PNG signature
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, found = int.from_bytes(head[:4], "big"), head[4:]
            if found == kind:
                data = fp.read(length)
                return data if len(data) == length else None
            if found == b"IEND":
                return None
            fp.seek(length + 4, io.SEEK_CUR)  # data and CRC
    finally:
        fp.seek(start)


def _side_limited(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most `max_side` (unchanged if it already is)."""
    if max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def decoded_size(source: bytes | str | Path) -> tuple[int, int] | None:
    """(height, width) of the image as shown, reduced to TOTALRECALL_MAX_IMAGE_SIDE, from the header
    alone; None if unreadable. Maps and masks have this size. `decode_image` returns it exactly, except
    for a JPEG decoded at a reduced scale (`at_least`, or above the side limit: up to half smaller)."""
    _pillow_limit()
    try:  # a path is opened, not read: Pillow reads only the header
        with open_image(source) as img:
            return _shown_size(img.size, _orientation(img), get_settings().max_image_side)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, *DECODER_FAULTS):
        return None


def bits_used(source: bytes | str | Path) -> int | None:
    """Bits that the largest sample of an image stored with more than 8 bits a sample needs (12 for a
    Mono12 camera's 16-bit file with any pixel above 2047; an alpha channel does not count); None for
    images of 8-bit samples and for unreadable ones. Decodes the pixels of high-bit images only."""
    max_pixels = _pillow_limit()
    try:
        with open_image(source) as img:
            if img.size[0] * img.size[1] > max_pixels:
                return None  # a refused image fails, with its reason, when it is decoded
            grey = img.mode in HIGH_BIT_MODES
            if not grey and not _is_high_bit_colour(img):
                return None
            with DECODING.hold(img.size[0] * img.size[1], max_pixels):
                if grey:
                    return max(1, int(np.asarray(img).max()).bit_length())
                data = source if isinstance(source, bytes) else Path(source).read_bytes()
                pixels = _high_bit_pixels(img, data)
                return max(1, int(pixels[..., :_colour_channels(pixels)].max()).bit_length())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, *DECODER_FAULTS):
        return None


def _reduce(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink by an integer factor (box filter) while the longer side stays >= max_side.

    Done right after decoding, so the mode conversions that follow work on the smaller image. Palette
    indices cannot be averaged: palette images are first converted to the colours they stand for.
    """
    factor = max(img.size) // max_side
    if factor < 2:
        return img
    if img.mode == "1":  # modes reduce() refuses: into the smallest mode that keeps them
        img = img.convert("L")
    elif img.mode in ("P", "PA"):  # (PA it accepts, averaging the indices: wrong colours)
        img = img.convert("RGBA" if _with_alpha(img) else "RGB")
    try:
        return img.reduce(factor)
    except ValueError:  # 16-bit grey (Pillow cannot reduce it): made 8-bit at full size, then resized
        return img


def _with_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _high_bit_grey_to_8_bits(img: Image.Image, bit_depth: int) -> Image.Image:
    """A grey image of integer samples wider than 8 bits as an L image: scaled from the product's
    significant bits, else the 16-bit range; never from the image's own maximum, so that every image of a
    product is scaled alike (32-bit integers above 16 bits saturate)."""
    top = float(2**bit_depth - 1) if bit_depth else 65535.0
    return Image.fromarray(_to_8_bits(np.asarray(img), top))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "F":  # no range to scale from that would be the same for every image of a product
        raise ImageDecodeError("32-bit floating-point samples are not supported (their range is unknown): "
                               "export the images with 8- or 16-bit integer samples")
    if _with_alpha(img):
        if img.mode not in ("RGBA", "LA"):
            img = img.convert("RGBA")
        rgb = Image.new("RGB", img.size)  # composited over black, as Image.alpha_composite, without its copies
        rgb.paste(img, mask=img)
        return rgb
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1 ...


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG encoding of an (H, W) or (H, W, 3) uint8 array (zlib level 0-9: 6 is Pillow's default)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
