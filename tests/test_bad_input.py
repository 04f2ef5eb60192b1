"""Bad input through whole jobs: every bad image becomes a failed row with a clear reason, the batch goes on,
the worker stays up, and the job completes (`--wait` exits 0 and lists the failures).

The embedded part runs the `totalrecall` command line as an operator would (SQLite, a local folder, tasks
in-process) and measures the scoring process's peak memory; the S3 part goes through a real worker.
Decoding itself is unit-tested in test_engine_patchcore.py; an empty archive, an unknown product and a
product without an active model are covered by test_system.py and test_workers.py.
"""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.db import fresh_database
from common.synthetic import nominal_image, plant_defect, png_bytes
from tests.cluster import PRODUCT, SIZE, Cluster, cluster, ok
from tests.conftest import Services, without_root_powers
from tests.synthetic import one_bit_png

MAX_SIDE = 1024  # images are reduced to this while decoding (the model's input is 96 px)
MAX_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Embedded:
    home: Path
    env: dict[str, str]


# Runs a command as its own child and writes that child's peak RSS (KiB) to argv[1]. Linux carries a
# process's peak RSS across exec as a floor for the new program, and a child spawned straight from this test
# process starts from the test process's own peak (1.4 GB or more after in-process engine tests); a child of
# this small helper starts from the helper's few MB, so the figure is the command's own.
_PEAK_OF_CHILD = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_measured(env: dict[str, str], *args: str) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MB) of one `totalrecall` command, run as a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak_kib"
        proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, str(peak), sys.executable, "-m",
                               "totalrecall.cli", *args], env=env, capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr, int(peak.read_text()) / 1024


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    home = tmp_path_factory.mktemp("bad-input")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOTALRECALL_", "AWS_"))}
    env |= {"TOTALRECALL_HOME": str(home), "TOTALRECALL_CHUNK_SIZE": "8",
            "TOTALRECALL_MAX_IMAGE_SIDE": str(MAX_SIDE), "TOTALRECALL_MAX_IMAGE_BYTES": str(MAX_BYTES)}
    (home / "train").mkdir()
    for i in range(10):
        (home / "train" / f"n{i}.png").write_bytes(png_bytes(nominal_image(i, SIZE)))
    for args in (("db", "upgrade"),
                 ("product", "add", PRODUCT, "--train", str(home / "train"), "--archive",
                  str(home / "archive/{date}"), "--image-size", str(SIZE), "--coreset-ratio", "0.25"),
                 ("fit", PRODUCT, "--wait")):
        rc, out, err, _ = _run_measured(env, *args)
        assert rc == 0, out + err
    return Embedded(home, env)


def _eps(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("L").save(buf, "EPS")
    return buf.getvalue()


def _jpeg(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _bad_inputs() -> tuple[dict[str, bytes], dict[str, str], dict[str, tuple[int, int]]]:
    """(file name -> bytes, failing name -> expected reason, scored name -> expected mask shape (h, w))."""
    rgb = nominal_image(1, SIZE)
    good = Image.fromarray(rgb)
    wide = Image.fromarray(nominal_image(2, 128)).resize((128, 64))  # stored 128 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    big = Image.fromarray(nominal_image(3, SIZE)).resize((8000, 6000), Image.Resampling.BILINEAR)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), np.uint8))
    files = {
        "good-1.png": png_bytes(rgb),
        "good-2.png": png_bytes(plant_defect(nominal_image(4, SIZE), 4)[0]),
        "zero-bytes.png": b"",
        "truncated.png": png_bytes(rgb)[:400],
        "truncated.jpg": _jpeg(good)[:600],
        "text.png": b"this is a text file, not an image\n" * 4,
        "one-pixel.png": png_bytes(np.zeros((1, 1, 3), np.uint8)),
        "bomb.png": one_bit_png(50_000, 50_000),  # 2.5 gigapixels in a few hundred KB
        "too-many-bytes.png": _png(noise, compress_level=0),  # ~5.9 MB file
        "gray-16-bit.png": _png(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)),
        "rgba.png": _png(good.convert("RGBA")),
        "cmyk.jpg": _jpeg(good.convert("CMYK")),
        "palette.png": _png(good.convert("P")),
        "exif-rotated.jpg": _jpeg(wide, exif=exif.tobytes()),
        "huge.jpg": _jpeg(big),  # 48 megapixels: decoded at 1/8 scale, its mask at the side-limited size
        "huge.png": _png(big.resize((6000, 4000)), compress_level=1),  # 24 megapixels: decoded, reduced
        "postscript.png": _eps(good),  # never handed to Ghostscript, which has no time limit
    }
    failing = {
        "zero-bytes.png": "empty file (0 bytes)",
        "truncated.png": "corrupt or truncated image",
        "truncated.jpg": "corrupt or truncated image",
        "text.png": "not a recognised image format",
        "one-pixel.png": "1x1 pixels, too small to inspect",
        "bomb.png": "refused without decoding",
        "too-many-bytes.png": "above the limit of 4,194,304 (TOTALRECALL_MAX_IMAGE_BYTES); not downloaded",
        "postscript.png": "not a recognised image format",
    }
    shapes = {"good-1.png": (SIZE, SIZE), "good-2.png": (SIZE, SIZE), "gray-16-bit.png": (SIZE, SIZE),
              "rgba.png": (SIZE, SIZE), "cmyk.jpg": (SIZE, SIZE), "palette.png": (SIZE, SIZE),
              "exif-rotated.jpg": (128, 64),  # as a viewer shows it
              "huge.jpg": (768, MAX_SIDE), "huge.png": (683, MAX_SIDE)}
    assert set(files) == set(failing) | set(shapes)
    return files, failing, shapes


def test_every_bad_image_fails_alone_with_its_reason(embedded: Embedded) -> None:
    files, failing, shapes = _bad_inputs()
    folder = embedded.home / "batch"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rc, out, err, peak_mb = _run_measured(embedded.env, "score", PRODUCT, "--images", str(folder), "--wait")
    assert rc == 0, out + err  # a job whose images partly fail still succeeds
    assert f"{len(failing)} failed image(s)" in out
    for name in failing:
        assert f"{folder / name}: " in out  # each failure listed with its reason
    # The 2.5-gigapixel bomb was never decoded (that alone would take > 2.5 GB); large images were
    # decoded at a reduced scale or reduced right after decoding.
    print(f"peak RSS of the scoring process: {peak_mb:.0f} MB")
    assert peak_mb < 1500, peak_mb

    with sqlite3.connect(embedded.home / "totalrecall.db") as db:
        rows = {Path(uri).name: (status, error, mask) for uri, status, error, mask in db.execute(
            "SELECT image_uri, status, error, mask_uri FROM results WHERE image_uri LIKE ?",
            (f"{folder}/%",))}
        ((status, total, done, failed),) = db.execute(
            "SELECT status, total, done, failed FROM jobs WHERE images_uri = ?", (str(folder),)).fetchall()
    assert (status, total, done, failed) == ("succeeded", len(files), len(shapes), len(failing))
    assert set(rows) == set(files)
    for name, reason in failing.items():
        status, error, mask = rows[name]
        assert status == "failed" and reason in error and mask is None, (name, error)
    assert "2,500,000,000" in rows["bomb.png"][1] or "2500000000" in rows["bomb.png"][1]
    for name, shape in shapes.items():
        status, error, mask = rows[name]
        assert status == "ok", (name, error)
        with Image.open(mask) as png:
            assert (png.height, png.width) == shape, name


def _score_rows(embedded: Embedded, folder: Path, *wrap: str, timeout: float = 300
                ) -> tuple[str, dict[str, tuple[str, str | None]], tuple]:
    """`score --wait` of `folder` (run under the `wrap` command, if any): its output, the job's rows by
    URI below the folder (status, error) and the job's (status, total, done, failed)."""
    proc = subprocess.run([*wrap, sys.executable, "-m", "totalrecall.cli", "score", PRODUCT, "--images",
                           str(folder), "--wait"], env=embedded.env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with sqlite3.connect(embedded.home / "totalrecall.db") as db:
        ((job_id, *counts),) = db.execute("SELECT id, status, total, done, failed FROM jobs WHERE images_uri = ?"
                                          " ORDER BY id DESC LIMIT 1", (str(folder),)).fetchall()
        rows = {uri[len(str(folder)) + 1:]: (status, error) for uri, status, error in db.execute(
            "SELECT image_uri, status, error FROM results WHERE job_id = ?", (job_id,))}
    return proc.stdout, rows, tuple(counts)


def test_a_pipe_named_like_an_image_fails_alone_instead_of_hanging_the_batch(embedded: Embedded) -> None:
    """A FIFO (or a device) with an image name: reading it would wait for a writer for ever; in-process
    that hung the command, on a worker it held a download thread for ever and failed only at the chunk's
    time budget."""
    folder = embedded.home / "pipes"
    folder.mkdir()
    (folder / "a-good.png").write_bytes(png_bytes(nominal_image(80, SIZE)))
    os.mkfifo(folder / "camera-pipe.png")
    (folder / "z-good.png").write_bytes(png_bytes(nominal_image(81, SIZE)))
    out, rows, counts = _score_rows(embedded, folder, timeout=60)
    assert counts == ("succeeded", 3, 2, 1)
    assert rows["a-good.png"][0] == rows["z-good.png"][0] == "ok"
    status, error = rows["camera-pipe.png"]
    assert status == "failed" and "not a regular file" in error, error
    assert f"{folder / 'camera-pipe.png'}: " in out


def test_file_names_that_are_not_utf8_are_scored(embedded: Embedded) -> None:
    """Names whose bytes are not UTF-8 (an old camera's Latin-1 "Prüfteil"): the database cannot hold them
    as they are, which failed the whole folder (and a product's whole night) with a UnicodeEncodeError. They
    are recorded as `ls -b` shows them (\\xHH), and scored."""
    folder = embedded.home / "latin1"
    folder.mkdir()
    raw = os.fsencode(folder)
    (folder / "good.png").write_bytes(png_bytes(nominal_image(82, SIZE)))
    Path(os.fsdecode(raw + b"/Pr\xfcfteil 7.png")).write_bytes(png_bytes(nominal_image(83, SIZE)))
    Path(os.fsdecode(raw + b"/Linie \xe4")).mkdir()
    Path(os.fsdecode(raw + b"/Linie \xe4/teil.png")).write_bytes(png_bytes(nominal_image(84, SIZE)))
    Path(os.fsdecode(raw + b"/kaputt \xff.png")).write_bytes(b"not an image")
    out, rows, counts = _score_rows(embedded, folder)
    assert counts == ("succeeded", 4, 3, 1), out
    assert rows == {"good.png": ("ok", None), "Pr\\xfcfteil 7.png": ("ok", None),
                    "Linie \\xe4/teil.png": ("ok", None),
                    "kaputt \\xff.png": ("failed", "ImageDecodeError: not a recognised image format")}
    # Scored again: nothing left to do (the recorded names match what the folder lists).
    again = subprocess.run([sys.executable, "-m", "totalrecall.cli", "score", PRODUCT, "--images", str(folder)],
                           env=embedded.env, capture_output=True, text=True)
    assert again.returncode == 0 and "1 image(s) enqueued, 3 already scored" in again.stdout, again.stdout


def test_an_unreadable_subfolder_is_a_failed_row_not_a_silent_skip(embedded: Embedded) -> None:
    folder = embedded.home / "locked"
    (folder / "line-2").mkdir(parents=True)
    (folder / "good.png").write_bytes(png_bytes(nominal_image(85, SIZE)))
    (folder / "unreadable.png").write_bytes(png_bytes(nominal_image(86, SIZE)))
    (folder / "line-2" / "hidden.png").write_bytes(png_bytes(nominal_image(87, SIZE)))
    (folder / "unreadable.png").chmod(0)
    (folder / "line-2").chmod(0)
    try:
        out, rows, counts = _score_rows(embedded, folder, *without_root_powers())
    finally:
        (folder / "line-2").chmod(0o755)
    assert counts == ("succeeded", 3, 1, 2), out
    assert rows["good.png"] == ("ok", None)
    for name in ("unreadable.png", "line-2"):
        status, error = rows[name]
        assert status == "failed" and "Permission denied" in error, (name, error)


def test_a_training_folder_with_an_unreadable_subfolder_fails_the_fit(embedded: Embedded) -> None:
    """Its images would be left out, and the fit's failure rule counts the folder as one image: a model of
    half the training set would pass for a model of all of it."""
    train = embedded.home / "train-locked"
    (train / "line-2").mkdir(parents=True)
    for i in range(6):
        (train / f"n{i}.png").write_bytes(png_bytes(nominal_image(200 + i, SIZE)))
        (train / "line-2" / f"m{i}.png").write_bytes(png_bytes(nominal_image(300 + i, SIZE)))
    rc, out, err, _ = _run_measured(embedded.env, "product", "add", "locked", "--train", str(train), "--archive",
                                    str(embedded.home / "archive-locked/{date}"), "--image-size", str(SIZE))
    assert rc == 0, out + err
    (train / "line-2").chmod(0)
    try:
        fit = subprocess.run([*without_root_powers(), sys.executable, "-m", "totalrecall.cli", "fit", "locked",
                              "--wait"], env=embedded.env, capture_output=True, text=True, timeout=300)
    finally:
        (train / "line-2").chmod(0o755)
    assert fit.returncode != 0
    with sqlite3.connect(embedded.home / "totalrecall.db") as db:
        ((status, error),) = db.execute("SELECT j.status, j.error FROM jobs j JOIN products p ON p.id = j.product_id "
                                        "WHERE p.name = 'locked' AND j.kind = 'fit'").fetchall()
    assert status == "failed" and f"cannot read line-2 under {train}" in error, error


# --- through S3 and a real worker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with (fresh_database(services.pg_url) as pg_url,
          cluster(services, pg_url, tmp_path_factory.mktemp("bad-s3")) as running):
        running.start_workers("w")
        yield running


@pytest.mark.integration
def test_odd_keys_and_empty_objects_through_s3_and_a_worker(c: Cluster) -> None:
    day = date(2026, 7, 1)
    prefix = f"archive/{day}/{PRODUCT}"
    odd = c.put(f"{prefix}/line 3/Prüfteil ü #7 (rechts).png", png_bytes(nominal_image(70, SIZE)))
    empty = c.put(f"{prefix}/empty.png", b"")
    text = c.put(f"{prefix}/text.png", b"not an image")
    good = c.put(f"{prefix}/good.png", png_bytes(nominal_image(71, SIZE)))
    c.put(f"{prefix}/notes.txt", b"ignored: not an image name")
    out = ok(c.cli("nightly", "--date", str(day), "--wait"))
    assert f"{empty}: ImageDecodeError: empty file (0 bytes)" in out
    assert f"{text}: ImageDecodeError: not a recognised image format" in out
    (job,) = c.jobs(day)
    rows = {r.image_uri: r for r in c.assert_exactly_once(job, [odd, empty, text, good])}
    assert rows[odd].status == "ok" and rows[good].status == "ok"
    mask_key = rows[odd].mask_uri.split("/", 3)[3]
    assert mask_key.isascii() and " " not in mask_key and "line_3/Pr" in mask_key
    c.assert_outputs_complete([rows[odd], rows[good]])
    # The worker is still up and scores the next job.
    again = c.put("adhoc/after/one.png", png_bytes(nominal_image(72, SIZE)))
    ok(c.cli("score", PRODUCT, "--images", f"s3://{c.bucket}/adhoc/after/", "--wait"))
    assert [r.status for r in c.results(image_uri=again)] == ["ok"]
    assert c.workers["w"].alive()
    # The empty file replaced by an image and the folder scored again: both failed images move to the
    # new job (one now ok, one failed again), and the nightly's counts follow its remaining rows.
    c.put(f"{prefix}/empty.png", png_bytes(nominal_image(73, SIZE)))
    ok(c.cli("score", PRODUCT, "--images", f"s3://{c.bucket}/{prefix}/", "--wait"))
    (repaired,), (still_bad,) = c.results(image_uri=empty), c.results(image_uri=text)
    assert (repaired.status, still_bad.status) == ("ok", "failed")
    assert repaired.job_id == still_bad.job_id != job.id
    rescore = c.job(repaired.job_id)
    assert (rescore.status, rescore.total, rescore.done, rescore.failed) == ("succeeded", 2, 1, 1)
    nightly = c.job(job.id)
    assert (nightly.status, nightly.total, nightly.done, nightly.failed) == ("succeeded", 2, 2, 0)
