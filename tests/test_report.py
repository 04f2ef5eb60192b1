"""`totalrecall report`: a real SQLite database and storage folder, the page checked in headless Chromium."""

from __future__ import annotations

import argparse
import base64
import html
import io
import re
import subprocess
from dataclasses import dataclass
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sqlalchemy import select

from common.db import (
    Job,
    JobKind,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Product,
    Result,
    ResultStatus,
    Review,
    session_scope,
    utcnow,
)
from common.migrate import upgrade
from common.settings import reset_settings_cache
from common.synthetic import mask_png_bytes, nominal_image, plant_defect, png_bytes
from tests.synthetic import mono12_png
from totalrecall.report import (
    THUMB_SIDE,
    add_report_command,
    build_report,
    card_pictures,
    histogram_svg,
    load_report_data,
    overlay,
)

CHROMIUM = Path("/usr/bin/chromium")
SIZE = 480  # larger than THUMB_SIDE: the report must downscale
TOP_N = 5
THRESHOLD = 1.0
FAILURES = {
    "part-broken.png": "corrupt or truncated image: image file is truncated (14 bytes not processed)",
    "part-gone.png": "no object at /archive/part-gone.png",
}
MALICIOUS = "<script>alert(1)</script>.png"


@dataclass(frozen=True)
class Scenario:
    url: str
    job_id: int
    by_score: list[str]  # image URIs of the scored images, most anomalous first
    missing_heatmap: str  # the image whose heatmap file was deleted
    failed: dict[str, str]  # image URI -> reason


def _heatmap(mask: np.ndarray) -> np.ndarray:
    """A grey heatmap like the workers write: 128 at the pixel threshold, hot where the mask is."""
    blurred = ndimage.gaussian_filter(mask.astype(np.float32), sigma=6)
    return np.clip(30 + 400 * blurred, 0, 255).astype(np.uint8)


def _setup(tmp_path: Path, extra_failures: dict[str, str] | None = None) -> Scenario:
    url = f"sqlite:///{tmp_path / 'totalrecall.db'}"
    upgrade(url)
    archive, results = tmp_path / "archive", tmp_path / "storage" / "results"
    archive.mkdir()
    results.mkdir(parents=True)
    scored: list[tuple[str, float, bool, str | None, str | None]] = []  # uri, score, anomalous, mask, heatmap
    for i in range(8):
        image = nominal_image(i, SIZE)
        anomalous = i < 4
        mask = np.zeros(image.shape[:2], dtype=bool)
        if anomalous:
            image, mask = plant_defect(image, i, kind="stain" if i % 2 else "scratch")
        uri = archive / f"part-{i:03d}.png"
        uri.write_bytes(png_bytes(image))
        mask_path, heat_path = results / f"part-{i:03d}_mask.png", results / f"part-{i:03d}_heatmap.png"
        mask_path.write_bytes(mask_png_bytes(mask))
        heat_path.write_bytes(png_bytes(_heatmap(mask)))
        score = 2.6 - 0.2 * i if anomalous else 0.9 - 0.1 * i
        if anomalous:
            scored.append((str(uri), score, anomalous, str(mask_path), str(heat_path)))
        else:  # nothing found: no PNGs, as TOTALRECALL_SAVE_MAPS=findings writes them
            scored.append((str(uri), score, anomalous, None, None))
    missing_heatmap = scored[1][0]
    Path(scored[1][4]).unlink()  # fetched by the report: must become a placeholder, not a crash
    failed = {str(archive / name): reason for name, reason in (FAILURES | (extra_failures or {})).items()}

    with session_scope(url) as session:
        product = Product(name="widget", train_uri=str(tmp_path / "train"),
                          archive_uri_template=str(archive) + "/{date}")
        session.add(product)
        session.flush()
        version = ModelVersion(product_id=product.id, version=3, artifact_uri=str(tmp_path / "models"),
                               sha256="ab" * 32, image_threshold=THRESHOLD, pixel_threshold=0.5,
                               train_image_count=60, status=ModelStatus.READY.value)
        session.add(version)
        session.flush()
        version.is_active = True
        now = utcnow()
        job = Job(kind=JobKind.SCORE.value, product_id=product.id, model_version_id=version.id,
                  status=JobStatus.SUCCEEDED.value, total=len(scored) + len(failed), done=len(scored),
                  failed=len(failed), images_uri=str(archive), run_date=date(2026, 11, 27),
                  created_at=now - timedelta(seconds=40), started_at=now - timedelta(seconds=30),
                  finished_at=now, enqueued_by="test")
        session.add(job)
        session.flush()
        common = {"job_id": job.id, "model_version_id": version.id, "product_id": product.id,
                  "captured_date": date(2026, 11, 27)}
        for uri, score, anomalous, mask_uri, heat_uri in scored:
            session.add(Result(**common, image_uri=uri, status=ResultStatus.OK.value, score=score,
                               threshold=THRESHOLD, is_anomalous=anomalous, mask_uri=mask_uri,
                               heatmap_uri=heat_uri, defect_fraction=0.01 if anomalous else 0.0,
                               max_y=10, max_x=20))
        for uri, reason in failed.items():
            session.add(Result(**common, image_uri=uri, status=ResultStatus.FAILED.value, error=reason))
        job_id = job.id
    by_score = [uri for uri, *_ in sorted(scored, key=lambda s: -s[1])]
    return Scenario(url, job_id, by_score, missing_heatmap, failed)


class _Dom(HTMLParser):
    """Collects what the assertions need from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cards = 0
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.failure_rows = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        self.cards += "card" in classes
        self.failure_rows += tag == "tr" and "failure" in classes
        self.tags.append((tag, attributes))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    dom.close()
    return dom


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
               "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _console_messages(stderr: str) -> list[str]:
    """Lines Chromium logs for the page's console (errors, CSP violations, any console.* call)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian package `chromium` is not "
                                    "installed (/usr/bin/chromium): apt-get install -y chromium")


def test_report_content(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    out = build_report(s.job_id, tmp_path / "out" / "report.html", top_n=TOP_N, database_url=s.url)
    page = out.read_text(encoding="utf-8")
    dom = _parse(page)

    assert dom.cards == TOP_N
    ranks = [int(m) for m in re.findall(r'<span class="rank">#(\d+)</span>', page)]
    assert ranks == list(range(1, TOP_N + 1))
    names = re.findall(r'<div class="name" title="([^"]+)"', page)
    assert names == s.by_score[:TOP_N]  # most anomalous first
    assert page.count('class="verdict anomalous"') == 4 and page.count('class="verdict ok"') == 1

    assert dom.failure_rows == len(FAILURES)
    text = " ".join(dom.text)
    for uri, reason in s.failed.items():
        assert uri in text and reason in text
    assert "widget" in text and f"#{s.job_id} · score · succeeded" in text and "v3" in text
    assert "threshold 1" in text  # the histogram's threshold label

    # The deleted heatmap is a placeholder naming the cause; the other pictures are embedded.
    assert "heatmap unavailable: no object at" in text
    assert "no heatmap saved for this image" in text and "no mask saved for this image" in text  # nominal card
    images = [attrs for tag, attrs in dom.tags if tag == "img"]
    assert len(images) == 3 * TOP_N - 3
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(picture.size) <= THUMB_SIDE

    # Self-contained: no script, no URL of any network resource, a CSP forbidding everything else.
    assert not any(tag in ("script", "link", "iframe", "object") for tag, _ in dom.tags)
    assert "http://" not in page and "https://" not in page
    assert all(not (value or "").startswith("//") for _, attrs in dom.tags for value in attrs.values())
    policies = [a["content"] for t, a in dom.tags
                if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert policies == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    assert out.stat().st_size < 2_000_000


def test_report_cards_show_inspector_reviews(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    with session_scope(s.url) as session:
        product_id = session.scalars(select(Product.id)).one()
        session.add_all([
            Review(product_id=product_id, image_uri=s.by_score[0], label="defective", defect_type="crack"),
            Review(product_id=product_id, image_uri=s.by_score[2], label="good", reviewed_by="ana",
                   note="<b>lens dust</b>"),
        ])
    page = build_report(s.job_id, tmp_path / "report.html", top_n=TOP_N, database_url=s.url).read_text()
    cards = page.split('<div class="card ')[1:]
    assert '<div class="review">reviewed defective (crack)</div>' in cards[0]
    assert '<div class="review">reviewed good by ana: &lt;b&gt;lens dust&lt;/b&gt;</div>' in cards[2]
    assert sum('class="review"' in card for card in cards) == 2  # the unreviewed cards have none
    assert "totalrecall review mark widget IMAGE_URI" in page


@needs_chromium
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    out = build_report(s.job_id, tmp_path / "report.html", top_n=TOP_N, database_url=s.url)

    dumped = _chromium(tmp_path, "--dump-dom", out.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    dom = _parse(dumped.stdout)
    assert dom.cards == TOP_N
    assert dom.failure_rows == len(FAILURES)
    text = " ".join(dom.text)
    assert all(reason in text for reason in FAILURES.values())
    assert _console_messages(dumped.stderr) == []

    shot = tmp_path / "shot.png"
    shown = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                      out.as_uri())
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert _console_messages(shown.stderr) == []
    with Image.open(shot) as picture:
        assert picture.size == (1280, 2000)
        pixels = np.asarray(picture.convert("RGB"))
    # Rendered, not blank: the histogram's red and blue bars and the photos give many distinct colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


@needs_chromium
def test_console_check_catches_script_errors(tmp_path: Path) -> None:
    """The console assertion above is not vacuous: a page with a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    result = _chromium(tmp_path, "--dump-dom", page.as_uri())
    messages = _console_messages(result.stderr)
    assert any("undefinedFunction" in line for line in messages), result.stderr[-3000:]


def test_report_escapes_text_from_the_database(tmp_path: Path) -> None:
    s = _setup(tmp_path, extra_failures={MALICIOUS: '<img src=x onerror="alert(2)">'})
    with session_scope(s.url) as session:  # the most anomalous image gets a hostile, unreadable URI
        row = session.query(Result).filter_by(image_uri=s.by_score[0]).one()
        row.image_uri = str(tmp_path / MALICIOUS)
    page = build_report(s.job_id, tmp_path / "report.html", top_n=TOP_N, database_url=s.url).read_text()

    assert "<script" not in page and '<img src=x' not in page and 'onerror="' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    dom = _parse(page)
    assert not any(tag == "script" for tag, _ in dom.tags)
    assert all(not any(k.startswith("on") for k in attrs) for _, attrs in dom.tags)
    assert dom.cards == TOP_N and dom.failure_rows == len(FAILURES) + 1
    assert "original image unavailable: no object at" in " ".join(dom.text)


def test_report_of_a_job_without_results(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    with session_scope(s.url) as session:
        fit = Job(kind=JobKind.FIT.value, product_id=session.query(Product).one().id,
                  status=JobStatus.QUEUED.value, enqueued_by="test")
        session.add(fit)
        session.flush()
        fit_id = fit.id
    page = build_report(fit_id, tmp_path / "fit.html", database_url=s.url).read_text()
    dom = _parse(page)
    assert dom.cards == 0 and dom.failure_rows == 0
    assert "No scored images." in page and "No scores to plot." in page and "No failures." in page

    with pytest.raises(LookupError, match="no job 999"):
        build_report(999, tmp_path / "none.html", database_url=s.url)


def test_report_of_a_fit_job_lists_the_training_images_it_could_not_read(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    unreadable = str(tmp_path / "train" / "bad <1>.png")
    with session_scope(s.url) as session:
        product = session.query(Product).one()
        version = ModelVersion(product_id=product.id, version=4, status=ModelStatus.READY.value,
                               validation={"failed_images": [{"uri": unreadable, "error": "corrupt or truncated"}]})
        session.add(version)
        session.flush()
        fit = Job(kind=JobKind.FIT.value, product_id=product.id, model_version_id=version.id,
                  status=JobStatus.SUCCEEDED.value, total=20, done=19, failed=1, enqueued_by="test")
        session.add(fit)
        session.flush()
        fit_id = fit.id
    page = build_report(fit_id, tmp_path / "fit.html", database_url=s.url).read_text()
    dom = _parse(page)
    assert dom.failure_rows == 1 and "Failures (1)" in page
    assert html.escape(unreadable) in page and "corrupt or truncated" in page
    assert "20 training images read, 19 usable" in page


def test_report_output_and_top_zero(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    with pytest.raises(ValueError, match="is a folder: give a file name"):
        build_report(s.job_id, tmp_path, database_url=s.url)  # refused before anything is built
    page = build_report(s.job_id, tmp_path / "top0.html", top_n=0, database_url=s.url).read_text()
    assert "No images asked for (--top 0)." in page and "No scored images." not in page


def test_report_shows_a_mono12_original_as_the_model_read_it(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    gray = nominal_image(0, SIZE)[..., 1]
    Path(s.by_score[0]).write_bytes(mono12_png(gray))  # 16-bit file, values 0..4095
    with session_scope(s.url) as session:
        session.query(ModelVersion).one().config = {"bit_depth": 12}  # what the fit resolved
    card = load_report_data(s.job_id, TOP_N, s.url).top[0]
    assert card.image_uri == s.by_score[0] and card.bit_depth == 12
    original = np.asarray(card_pictures(card)[0], dtype=np.float64)
    assert abs(original.mean() - gray.mean()) < 3  # at the full 16-bit range it would be 16x darker


def test_report_shows_the_median_score_and_a_drift_warning(tmp_path: Path) -> None:
    s = _setup(tmp_path)
    warning = "score drift: the median image score 2.2 is 150% of the way from ... <refit>"
    with session_scope(s.url) as session:
        job = session.get(Job, s.job_id)
        job.median_score, job.warning = 2.25, warning
    page = build_report(s.job_id, tmp_path / "drift.html", database_url=s.url).read_text()
    text = " ".join(_parse(page).text)
    assert "Median image score" in text and "2.25" in text
    assert warning in text and "<refit>" not in page  # shown, and escaped


def test_report_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    s = _setup(tmp_path)
    monkeypatch.setenv("TOTALRECALL_DATABASE_URL", s.url)
    reset_settings_cache()  # `_setup` read the settings (opening its database) before this variable
    parser = argparse.ArgumentParser(prog="totalrecall")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli" / "job.html"
    args = parser.parse_args(["report", str(s.job_id), "--out", str(out), "--top", "2"])
    assert args.handler(args) == 0
    assert _parse(out.read_text()).cards == 2
    assert f"report of job {s.job_id} written to {out}" in capsys.readouterr().out
    from totalrecall.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["report", str(s.job_id), "--out", str(blocker / "job.html")]) == 2  # no traceback
    assert f"error: [Errno 17] File exists: '{blocker}'" in capsys.readouterr().err


def test_histogram_and_overlay_helpers() -> None:
    svg = histogram_svg([0.5, 0.7, 2.0], 1.0)
    assert svg.count('class="above"') == 1 and svg.count('class="below"') >= 1
    assert 'class="threshold"' in svg
    assert "<rect" in histogram_svg([3.0, 3.0, 3.0], None)  # degenerate range, no threshold
    assert histogram_svg([], 1.0) == '<p class="empty">No scores to plot.</p>'

    grey = Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8))
    cold = np.asarray(overlay(grey, Image.fromarray(np.zeros((8, 8), dtype=np.uint8))))
    hot = np.asarray(overlay(grey, Image.fromarray(np.full((8, 8), 255, dtype=np.uint8))))
    assert cold[0, 0, 2] > cold[0, 0, 0]  # blue tint where the map is cold
    assert hot[0, 0, 0] > 150 and hot[0, 0, 2] < 80  # red where it is hot, and blended more strongly
