"""`totalrecall demo` with no settings at all: SQLite, a local storage folder, tasks in-process."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.engine.metrics import image_auroc

IMAGES = 24


def _run_demo(home: Path, images: int = IMAGES) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOTALRECALL_", "AWS_"))}  # no service settings whatsoever
    return subprocess.run([sys.executable, "-m", "totalrecall.cli", "demo", "--home", str(home), "--images",
                           str(images)], env=env, cwd=home.parent, capture_output=True, text=True, timeout=300)


def _history(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT image_uri, verdict, score, mask_uri, error, created_at FROM anomaly_history "
            "ORDER BY image_uri").fetchall()


def test_demo_runs_embedded_and_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _run_demo(home)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "image AUROC vs planted truth  1.000" in first.stdout
    drift = re.search(r"score drift of the night\s+level (-?[0-9.]+) \(warning from 0.5\): none", first.stdout)
    assert drift and abs(float(drift.group(1))) < 0.5  # a night of good parts, a quarter with defects
    assert "sqlite3 " in first.stdout and "FROM anomaly_history WHERE verdict = 'anomalous'" in first.stdout

    rows = _history(home / "totalrecall.db")
    archive = sorted((home / "storage" / "archive").glob("*/demo-part/*.png"))
    assert len(archive) == IMAGES + 1  # + one deliberately truncated file
    assert sorted(r[0] for r in rows) == sorted(str(p) for p in archive)  # one row per archive image

    truth_dir = next((home / "truth").iterdir())
    defective = {m.name.replace("_mask.png", ".png") for m in truth_dir.glob("*_mask.png")}
    assert len(defective) == IMAGES // 4
    scored = [r for r in rows if r[1] != "failed"]
    labels = [Path(r[0]).name in defective for r in scored]
    assert all(r[1] == "anomalous" for r, bad in zip(scored, labels, strict=True) if bad)
    assert image_auroc(np.array([r[2] for r in scored]), np.array(labels)) >= 0.95
    for uri, verdict, _score, mask_uri, _error, _created in scored:
        if mask_uri is None:  # nothing found, so no mask and heatmap PNGs (TOTALRECALL_SAVE_MAPS=findings)
            assert verdict == "ok" and Path(uri).name not in defective
            continue
        mask = np.asarray(Image.open(mask_uri))
        assert Path(mask_uri).is_relative_to(home / "storage" / "results") and mask.shape == (160, 160)
        if Path(uri).name in defective:
            assert mask.max() == 255
    assert 0 < sum(r[3] is None for r in scored) < len(scored)
    (failed,) = [r for r in rows if r[1] == "failed"]
    assert failed[0].endswith("part-9999-truncated.png") and "ImageDecodeError" in failed[4]

    second = _run_demo(home)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "not refitting" in second.stdout and "idempotent no-op" in second.stdout
    assert _history(home / "totalrecall.db") == rows
    more = _run_demo(home, IMAGES + 8)  # images added after the night was inspected: not counted as missed
    assert more.returncode == 0, more.stdout + more.stderr
    assert "8 archive image(s) written after the night was inspected are not counted" in more.stdout
    assert f"of {IMAGES // 4} planted defects" in more.stdout
