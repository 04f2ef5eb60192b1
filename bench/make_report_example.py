"""The README's report screenshot and heatmap pictures, from a real end-to-end run on MVTec AD bottle.

    python bench/make_report_example.py     # writes docs/report-screenshot.png, docs/images/bottle_*.png

Runs the embedded default (SQLite, local storage, tasks in-process) in a temporary TOTALRECALL_HOME through
the `totalrecall` CLI: registers product `bottle` trained on the dataset's `train/good` folder (read in
place, by absolute path), copies the 83 test images into a temporary archive folder for one date (never
into the repository), fits with `--coreset-ratio 0.01`, runs the nightly inspection for that date, writes
the job's HTML report and screenshots it with headless Chromium (Debian package `chromium`).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
RUN_DATE = date(2026, 11, 27)
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_MAX_BYTES = 600_000
PICTURE_MAX_BYTES = 200_000
PANEL = 300  # side of each panel of a heatmap picture (original | overlay | mask)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec AD category folder")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where the pictures go")
    parser.add_argument("--top", type=int, default=12, help="cards in the report")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (report.html)")
    a = parser.parse_args()
    data = a.data.resolve()
    if not (data / "train" / "good").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"{data} is not an MVTec AD category folder (train/good, test/...)")

    work = Path(tempfile.mkdtemp(prefix="totalrecall-bottle-"))
    try:
        _embedded(work / "home")
        archive = work / "archive"
        copied = _copy_test_images(data / "test", archive / RUN_DATE.isoformat())
        print(f"work folder {work}: {copied} test images in the archive for {RUN_DATE}")
        job_id = _run_pipeline(data / "train" / "good", archive)
        report = _report(job_id, work, a.top)
        _screenshot(report, work, a.docs / "report-screenshot.png")
        for defect in sorted(p.name for p in (data / "test").iterdir() if p.is_dir() and p.name != "good"):
            _heatmap_picture(job_id, defect, a.docs / "images" / f"bottle_{defect}.png")
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _embedded(home: Path) -> None:
    """Point this process at a fresh embedded installation, whatever the environment says."""
    for name in [k for k in os.environ if k.startswith("TOTALRECALL_")]:
        del os.environ[name]
    os.environ["TOTALRECALL_HOME"] = str(home)
    from common.settings import reset_settings_cache
    from workers.app import app, configure

    reset_settings_cache()
    configure(app)


def _copy_test_images(test: Path, dest: Path) -> int:
    count = 0
    for image in sorted(test.glob("*/*.png")):
        target = dest / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        count += 1
    return count


def _cli(*argv: str) -> None:
    from totalrecall.cli import main as cli_main

    print(f"$ totalrecall {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    status = cli_main(list(argv))
    print(f"  ({time.perf_counter() - started:.1f} s)")
    if status != 0:
        raise SystemExit(f"`totalrecall {' '.join(argv)}` exited with {status}")


def _run_pipeline(train: Path, archive: Path) -> int:
    """db upgrade, product add, fit, nightly: returns the nightly score job's id."""
    from sqlalchemy import select

    from common.db import Job, JobKind, session_scope

    _cli("db", "upgrade")
    _cli("product", "add", "bottle", "--train", str(train), "--archive", f"{archive}/{{date}}/",
         "--coreset-ratio", "0.01")
    _cli("fit", "bottle", "--wait")
    _cli("nightly", "--date", RUN_DATE.isoformat(), "--wait")
    with session_scope() as session:
        return session.scalars(select(Job.id).where(Job.kind == JobKind.SCORE.value,
                                                    Job.run_date == RUN_DATE)).one()


def _report(job_id: int, work: Path, top: int) -> Path:
    from totalrecall.report import build_report

    report = build_report(job_id, work / "report.html", top_n=top)
    print(f"report {report} ({report.stat().st_size / 1024:.0f} KiB)")
    return report


def _screenshot(report: Path, work: Path, dest: Path) -> None:
    shot = work / "screenshot.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={work / 'chromium-profile'}", "--hide-scrollbars",
               f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not shot.exists():
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    with Image.open(shot) as picture:
        _save_small(picture.convert("RGB"), dest, SCREENSHOT_MAX_BYTES)


def _heatmap_picture(job_id: int, defect: str, dest: Path) -> None:
    """original | overlay | mask of the highest-scoring image of `defect`, each PANEL pixels square."""
    from sqlalchemy import select

    from common.db import Result, ResultStatus, session_scope
    from totalrecall.report import grey_like, overlay, thumbnail

    with session_scope() as session:
        row = session.scalars(select(Result).where(
            Result.job_id == job_id, Result.status == ResultStatus.OK.value,
            Result.image_uri.contains(f"/{defect}/")).order_by(Result.score.desc()).limit(1)).one()
    original = thumbnail(row.image_uri, "original image", PANEL)
    heat = grey_like(row.heatmap_uri, "heatmap", original.size)
    mask = grey_like(row.mask_uri, "mask", original.size).convert("RGB")
    canvas = Image.new("RGB", (3 * original.width, original.height))
    for i, panel in enumerate((original, overlay(original, heat), mask)):
        canvas.paste(panel, (i * original.width, 0))
    _save_small(canvas, dest, PICTURE_MAX_BYTES)
    verdict = "anomalous" if row.is_anomalous else "ok"
    print(f"  {defect}: {Path(row.image_uri).relative_to(Path(row.image_uri).parents[2])}, score "
          f"{row.score:.2f} ({verdict})")


def _save_small(picture: Image.Image, dest: Path, max_bytes: int) -> None:
    """Save as PNG under `max_bytes`: full colour if it fits, else fewer colours, else smaller."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dither = Image.Dither.FLOYDSTEINBERG
    candidates = [picture] + [picture.quantize(n, dither=dither) for n in (256, 128)]
    for scale in (0.9, 0.8, 0.7, 0.6, 0.5):
        smaller = picture.resize((round(picture.width * scale), round(picture.height * scale)),
                                 Image.Resampling.LANCZOS)
        candidates.append(smaller.quantize(128, dither=dither))
    for candidate in candidates:
        buf = io.BytesIO()
        candidate.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes:
            dest.write_bytes(buf.getvalue())
            size = f"{candidate.width}x{candidate.height} {candidate.mode}"
            print(f"{dest}: {size}, {buf.tell() / 1024:.0f} KiB")
            return
    raise SystemExit(f"could not bring {dest} under {max_bytes} bytes")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
