"""`totalrecall report JOB_ID --out FILE.html`: one self-contained HTML page about a job.

The page holds a summary, a score histogram with the image threshold (inline SVG), the most anomalous
images as cards (original, heatmap overlay, mask) and the failed images with their reasons. Images are
fetched from storage, reduced to `THUMB_SIDE` pixels and embedded as data URIs; an image that cannot be
fetched or decoded becomes a placeholder that says why. The page loads nothing from anywhere (a Content
Security Policy forbids it) and contains no script. Every text from the database is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import func, select

from common.db import Job, JobKind, Result, ResultStatus, Review, in_chunks, session_scope, utcnow
from common.images import decode_image
from common.settings import get_settings, redact_text
from common.storage import read_uri
from totalrecall.jobs_view import fit_failures

THUMB_SIDE = 384  # longest side of every embedded picture
MAX_FAILURES = 500  # failure rows listed (the count says how many there are in all)
HIST_BINS = 30
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# Heatmaps are grey with 128 at the pixel threshold (see workers.outputs): the colour turns yellow there.
_HEAT_STOPS = [(0.0, (30, 40, 200)), (0.3, (0, 150, 255)), (0.5, (255, 225, 0)), (0.75, (255, 100, 0)),
               (1.0, (210, 0, 0))]


@dataclass(frozen=True)
class Scored:
    """One scored image shown as a card."""

    rank: int
    image_uri: str
    score: float
    threshold: float | None
    is_anomalous: bool
    defect_fraction: float | None
    peak: tuple[int, int] | None
    mask_uri: str | None
    heatmap_uri: str | None
    bit_depth: int = 0  # how the model read the original (`PatchCoreConfig.bit_depth`), shown alike
    review: str | None = None  # an inspector's verdict on the image (`totalrecall review`), if any


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, read from the database in one session."""

    job_id: int
    kind: str
    status: str
    product: str
    version: int | None
    sha256: str | None
    image_threshold: float | None
    pixel_threshold: float | None
    images_uri: str | None
    run_date: date | None
    total: int
    scored: int
    failed: int
    anomalous: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    enqueued_by: str | None
    error: str | None
    median_score: float | None
    warning: str | None
    scores: np.ndarray
    top: list[Scored]
    failures: list[tuple[str, str]]


def build_report(job_id: int, out: Path, top_n: int = 12, database_url: str | None = None) -> Path:
    """Write the HTML report of job `job_id` to `out` and return `out` (LookupError: no such job)."""
    if top_n < 0:
        raise ValueError(f"--top must be 0 or more, got {top_n}")
    out = Path(out)
    if out.is_dir():  # refused before the report is built, not after
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {out / f'job-{job_id}.html'}")
    data = load_report_data(job_id, top_n, database_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return out


def add_report_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `totalrecall report JOB_ID --out FILE.html [--top N]`."""
    parser = subparsers.add_parser("report", help="write a self-contained HTML report of a job")
    parser.add_argument("job_id", type=int, metavar="JOB_ID")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.html")
    parser.add_argument("--top", type=int, default=12, metavar="N", help="most anomalous images shown "
                        "(default: 12)")
    parser.set_defaults(handler=_cmd_report)
    return parser


def _cmd_report(a: argparse.Namespace) -> int:
    path = build_report(a.job_id, a.out, a.top)
    print(f"report of job {a.job_id} written to {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


# --- data ----------------------------------------------------------------------------------------------


def load_report_data(job_id: int, top_n: int, database_url: str | None = None) -> ReportData:
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        mv = job.model_version
        of_job = Result.job_id == job_id
        ok = (Result.status == ResultStatus.OK.value) & Result.score.is_not(None)
        counts = {(status, bool(anomalous)): n for status, anomalous, n in session.execute(
            select(Result.status, Result.is_anomalous, func.count()).where(of_job)
            .group_by(Result.status, Result.is_anomalous))}
        scores = np.array(session.scalars(select(Result.score).where(of_job, ok)).all(), dtype=np.float64)
        top_rows = session.scalars(select(Result).where(of_job, ok)
                                   .order_by(Result.score.desc(), Result.id).limit(top_n)).all()
        failures = [(uri, error or "no reason recorded") for uri, error in session.execute(
            select(Result.image_uri, Result.error).where(of_job, Result.status == ResultStatus.FAILED.value)
            .order_by(Result.id).limit(MAX_FAILURES))]
        fit_failed = None
        if job.kind == JobKind.FIT.value:  # a fit's failures are the training images it could not read
            failures, fit_failed = fit_failures(job, MAX_FAILURES)
        bit_depth = int((mv.config or {}).get("bit_depth", 0)) if mv is not None else 0
        reviews = {rv.image_uri: _review_text(rv) for part in in_chunks([r.image_uri for r in top_rows])
                   for rv in session.scalars(select(Review).where(Review.product_id == job.product_id,
                                                                 Review.image_uri.in_(part)))}
        top = [Scored(i + 1, r.image_uri, r.score, r.threshold, bool(r.is_anomalous), r.defect_fraction,
                      (r.max_y, r.max_x) if r.max_y is not None and r.max_x is not None else None,
                      r.mask_uri, r.heatmap_uri, bit_depth, reviews.get(r.image_uri))
               for i, r in enumerate(top_rows)]
        threshold = mv.image_threshold if mv is not None else None
        if threshold is None and top:
            threshold = top[0].threshold
        failed = sum(n for (status, _), n in counts.items() if status == ResultStatus.FAILED.value)
        if fit_failed is not None:
            failed = fit_failed
        return ReportData(
            job_id=job.id, kind=job.kind, status=job.status, product=job.product.name,
            version=mv.version if mv else None, sha256=mv.sha256 if mv else None,
            image_threshold=threshold, pixel_threshold=mv.pixel_threshold if mv else None,
            images_uri=job.images_uri, run_date=job.run_date, total=job.total,
            scored=sum(n for (status, _), n in counts.items() if status == ResultStatus.OK.value),
            failed=failed, anomalous=counts.get((ResultStatus.OK.value, True), 0),
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
            enqueued_by=job.enqueued_by, error=job.error, median_score=job.median_score, warning=job.warning,
            scores=scores, top=top, failures=failures,
        )


def _review_text(review: Review) -> str:
    text = f"reviewed {review.label}" + (f" ({review.defect_type})" if review.defect_type else "")
    return text + (f" by {review.reviewed_by}" if review.reviewed_by else "") + (
        f": {review.note}" if review.note else "")


# --- pictures ------------------------------------------------------------------------------------------


class PictureError(Exception):
    """A picture could not be produced; the message is shown in its placeholder."""


def thumbnail(uri: str | None, what: str, max_side: int = THUMB_SIDE, bit_depth: int = 0) -> Image.Image:
    """The image at `uri` as RGB, longest side at most `max_side` (PictureError says why not); an
    image of more than 8 bits a sample (grey or colour) scaled from `bit_depth` (`common.images.decode_image`)."""
    if not uri:
        raise PictureError(f"no {what} saved for this image (TOTALRECALL_SAVE_MAPS: by default only "
                           "images with a finding keep their mask and heatmap)")
    try:
        data = read_uri(uri, get_settings().max_image_bytes)  # the workers' limit: never a huge download
        return Image.fromarray(decode_image(data, max_side=max_side, bit_depth=bit_depth))
    except Exception as exc:  # any storage or decoding trouble becomes a placeholder, never a crash
        raise PictureError(f"{what} unavailable: {redact_text(str(exc)) or type(exc).__name__}") from exc


def grey_like(uri: str | None, what: str, size: tuple[int, int] | None) -> Image.Image:
    """The single-channel picture at `uri` (heatmap, mask), resized to `size` (width, height) if given."""
    picture = thumbnail(uri, what, max(size) if size else THUMB_SIDE).convert("L")
    return picture.resize(size, Image.Resampling.BILINEAR) if size and picture.size != size else picture


def colorize(heat: Image.Image) -> Image.Image:
    """A colour rendering of a grey heatmap (blue: low, yellow: at the pixel threshold, red: above)."""
    stops = np.array([s for s, _ in _HEAT_STOPS])
    colours = np.array([c for _, c in _HEAT_STOPS], dtype=np.float32)
    levels = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(levels, stops, colours[:, k]) for k in range(3)], axis=1).astype(np.uint8)
    return Image.fromarray(lut[np.asarray(heat)])


def overlay(original: Image.Image, heat: Image.Image) -> Image.Image:
    """`heat` (grey, same size) coloured and alpha-blended on `original`; stronger where it is hotter."""
    base = np.asarray(original.convert("RGB"), dtype=np.float32)
    colour = np.asarray(colorize(heat), dtype=np.float32)
    alpha = 0.25 + 0.5 * (np.asarray(heat, dtype=np.float32)[..., None] / 255.0)
    return Image.fromarray(np.clip(base * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8))


def data_uri(picture: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        picture.convert("RGB").save(buf, format="JPEG", quality=85, optimize=True)
    else:
        picture.save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def card_pictures(card: Scored) -> tuple[Image.Image | str, Image.Image | str, Image.Image | str]:
    """(original, overlay, mask): each a picture, or the reason it is missing."""
    try:
        original: Image.Image | str = thumbnail(card.image_uri, "original image", bit_depth=card.bit_depth)
    except PictureError as exc:
        original = str(exc)
    size = original.size if isinstance(original, Image.Image) else None
    try:
        heat = grey_like(card.heatmap_uri, "heatmap", size)
        blended: Image.Image | str = overlay(original, heat) if size else colorize(heat)
    except PictureError as exc:
        blended = str(exc)
    try:
        mask: Image.Image | str = grey_like(card.mask_uri, "mask", size)
    except PictureError as exc:
        mask = str(exc)
    return original, blended, mask


# --- HTML ----------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(data: ReportData) -> str:
    title = f"TotalRecall report: job {data.job_id} ({data.product})"
    histogram = histogram_svg(data.scores, data.image_threshold)
    empty = "No scored images." if not data.scored else "No images asked for (--top 0)."
    cards = "\n".join(_card(c, data.images_uri) for c in data.top) or f'<p class="empty">{empty}</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<div class="overview">
<section id="summary"><h2>Summary</h2>{_summary(data)}</section>
<section id="histogram"><h2>Score distribution</h2>{histogram}</section>
</div>
<section id="top"><h2>{esc(_top_heading(data))}</h2>
<p class="hint">A false alarm or a confirmed defect: <code>totalrecall review mark {esc(data.product)} IMAGE_URI
--good</code> (its next fit learns it) or <code>--defective</code>.</p><div class="cards">
{cards}
</div></section>
<section id="failures"><h2>Failures ({data.failed})</h2>{_failures(data)}</section>
<footer>Generated {esc(_when(utcnow()))} by <code>totalrecall report {data.job_id}</code>.</footer>
</body></html>
"""


def _top_heading(data: ReportData) -> str:
    return f"Most anomalous images (top {len(data.top)} of {data.scored} scored)"


def _summary(d: ReportData) -> str:
    version = "none"
    if d.version is not None:
        version = f"v{d.version}" + (f" (sha256 {d.sha256[:12]}…)" if d.sha256 else "")
    anomaly_rate = f" ({d.anomalous / d.scored:.1%} of scored)" if d.scored else ""
    job = f"#{d.job_id} · {d.kind} · {d.status}"
    if d.enqueued_by:
        job += f" · by {d.enqueued_by}"
    rows: list[tuple[str, str]] = [
        ("Product", d.product),
        ("Job", job),
        ("Model version", version),
        ("Images folder", d.images_uri or "—"),
        ("Run date", d.run_date.isoformat() if d.run_date else "—"),
        ("Images", f"{d.total} training images read, {d.total - d.failed} usable" if d.kind == JobKind.FIT.value
         else f"{d.total} in the job, {d.scored} scored"),
        ("Anomalies", f"{d.anomalous}{anomaly_rate}"),
        ("Failures", str(d.failed)),
        ("Median image score", _num(d.median_score)),
        ("Image threshold", _num(d.image_threshold)),
        ("Pixel threshold", _num(d.pixel_threshold)),
        ("Created", _when(d.created_at)),
        ("Started", _when(d.started_at) + _seconds(d.created_at, d.started_at, "queued")),
        ("Finished", _when(d.finished_at) + _seconds(d.started_at, d.finished_at, "ran")),
    ]
    run = _duration(d.started_at, d.finished_at)
    if run and d.scored + d.failed:
        rows.append(("Throughput", f"{(d.scored + d.failed) / run:.2f} images/s"))
    if d.error:
        rows.append(("Job message", d.error))
    if d.warning:
        rows.append(("Warning", d.warning))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _display_name(image_uri: str, images_uri: str | None) -> str:
    """The image's path below the job's images folder, else its file name."""
    prefix = (images_uri or "").rstrip("/") + "/"
    if images_uri and image_uri.startswith(prefix) and len(image_uri) > len(prefix):
        return image_uri[len(prefix):]
    return image_uri.rstrip("/").rsplit("/", 1)[-1]


def _card(c: Scored, images_uri: str | None) -> str:
    verdict = "anomalous" if c.is_anomalous else "ok"
    name = _display_name(c.image_uri, images_uri)
    original, blended, mask = card_pictures(c)
    figures = "".join(_figure(p, caption, fmt) for p, caption, fmt in (
        (original, "original", "JPEG"), (blended, "heatmap overlay", "JPEG"), (mask, "mask", "PNG")))
    details = [f"score {_num(c.score)}", f"threshold {_num(c.threshold)}"]
    if c.defect_fraction is not None:
        details.append(f"defect area {c.defect_fraction:.2%}")
    if c.peak is not None:
        details.append(f"peak at y={c.peak[0]}, x={c.peak[1]}")
    return (f'<div class="card {verdict}"><div class="head"><span class="rank">#{c.rank}</span>'
            f'<span class="verdict {verdict}">{verdict}</span><span class="score">{esc(_num(c.score))}</span>'
            f'</div><div class="name" title="{esc(c.image_uri)}">{esc(name)}</div>'
            f'<div class="views">{figures}</div><div class="meta">{esc(" · ".join(details))}</div>'
            + (f'<div class="review">{esc(c.review)}</div>' if c.review else "")
            + f'<div class="uri">{esc(c.image_uri)}</div></div>')


def _figure(picture: Image.Image | str, caption: str, fmt: str) -> str:
    if isinstance(picture, str):
        inner = f'<div class="placeholder">{esc(picture)}</div>'
    else:
        inner = f'<img src="{data_uri(picture, fmt)}" alt="{esc(caption)}" width="{picture.width}" ' \
                f'height="{picture.height}">'
    return f"<figure>{inner}<figcaption>{esc(caption)}</figcaption></figure>"


def _failures(d: ReportData) -> str:
    if not d.failures:
        return '<p class="empty">No failures.</p>'
    rows = "".join(f'<tr class="failure"><td class="uri">{esc(uri)}</td><td>{esc(reason)}</td></tr>'
                   for uri, reason in d.failures)
    more = (f'<p class="empty">… and {d.failed - len(d.failures)} more (see <code>totalrecall jobs '
            f'{d.job_id}</code>).</p>' if d.failed > len(d.failures) else "")
    return f'<table class="failures"><tr><th>image</th><th>reason</th></tr>{rows}</table>{more}'


def histogram_svg(scores: Sequence[float] | np.ndarray, threshold: float | None, bins: int = HIST_BINS,
                  width: int = 600, height: int = 240) -> str:
    """An inline SVG histogram of `scores`, bins above `threshold` in red, the threshold as a dashed line."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return '<p class="empty">No scores to plot.</p>'
    has_threshold = threshold is not None and math.isfinite(threshold)
    lo, hi = float(values.min()), float(values.max())
    if has_threshold:
        lo, hi = min(lo, threshold), max(hi, threshold)
    pad = (hi - lo) * 0.04 or max(abs(hi) * 0.05, 0.5)
    lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    left, right, top, bottom = 48, 16, 24, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(int(counts.max()), 1)

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg class="hist" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram">']
    for n, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if n == 0:
            continue
        x0, x1 = x_of(a), x_of(b)
        h = n / peak * plot_h
        above = has_threshold and (a + b) / 2 > threshold
        parts.append(f'<rect class="{"above" if above else "below"}" x="{x0 + 0.5:.1f}" '
                     f'y="{top + plot_h - h:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" height="{h:.1f}">'
                     f'<title>{esc(f"{a:.3g} – {b:.3g}: {n} image(s)")}</title></rect>')
    base_y = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" y1="{base_y}" x2="{left + plot_w}" y2="{base_y}"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{base_y}"/>')
    for v in np.linspace(lo, hi, 6):
        parts.append(f'<line class="axis" x1="{x_of(v):.1f}" y1="{base_y}" x2="{x_of(v):.1f}" '
                     f'y2="{base_y + 4}"/><text x="{x_of(v):.1f}" y="{base_y + 17}" '
                     f'text-anchor="middle">{esc(f"{v:.3g}")}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>'
                 f'<text x="{left - 6}" y="{base_y}" text-anchor="end">0</text>'
                 f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">image score '
                 f'({values.size} images)</text>')
    if has_threshold:
        tx = x_of(threshold)
        anchor = "end" if tx > left + plot_w * 0.8 else "start"
        offset = -4 if anchor == "end" else 4
        parts.append(f'<line class="threshold" x1="{tx:.1f}" y1="{top - 10}" x2="{tx:.1f}" y2="{base_y}"/>'
                     f'<text class="threshold" x="{tx + offset:.1f}" y="{top - 12}" text-anchor="{anchor}">'
                     f'threshold {esc(_num(threshold))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def _seconds(start: datetime | None, end: datetime | None, label: str) -> str:
    seconds = _duration(start, end)
    return "" if seconds is None else f" ({label} {seconds:.1f} s)"


_STYLE = """
body{font-family:"DejaVu Sans","Liberation Sans",Arial,sans-serif;margin:24px;color:#1d2430;
background:#f6f7f9}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d9dde3;padding:4px 10px;text-align:left;vertical-align:top;font-size:13px}
table.summary th{background:#eef1f5;width:130px}
table.summary td{max-width:420px;overflow-wrap:anywhere}
td.uri,div.uri{font-family:"DejaVu Sans Mono",monospace;font-size:11px;word-break:break-all}
.hist rect.below{fill:#5b8def}.hist rect.above{fill:#d9534f}
.hist line.axis{stroke:#555}.hist line.threshold{stroke:#c00;stroke-width:2;stroke-dasharray:6 4}
.hist text{font-size:11px;fill:#333}.hist text.threshold{fill:#c00;font-weight:bold}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.overview{display:flex;flex-wrap:wrap;column-gap:32px}
.card{background:#fff;border:1px solid #d9dde3;border-radius:6px;padding:10px;box-sizing:border-box;
width:calc(50% - 7px);min-width:480px}
.card.anomalous{border-left:5px solid #d9534f}.card.ok{border-left:5px solid #5cb85c}
.head{display:flex;gap:10px;align-items:baseline}.rank{font-weight:bold}
.verdict{text-transform:uppercase;font-size:11px;padding:1px 6px;border-radius:3px;color:#fff}
.verdict.anomalous{background:#d9534f}.verdict.ok{background:#5cb85c}.score{margin-left:auto;font-weight:bold}
.name{font-size:13px;margin:4px 0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.views{display:flex;gap:6px}figure{margin:0;flex:1;min-width:0}
figure img{width:100%;height:auto;display:block;background:#000}
figcaption{font-size:11px;color:#666;text-align:center}
.placeholder{aspect-ratio:1;background:#eceff3;border:1px dashed #b5bcc6;color:#7a2a2a;font-size:11px;
padding:6px;overflow:auto;word-break:break-all;box-sizing:border-box}
.meta{font-size:12px;color:#444;margin-top:4px}.empty{color:#666}
.review{font-size:12px;font-weight:bold;color:#235;margin-top:4px}.hint{font-size:13px;color:#444}
footer{margin-top:24px;font-size:11px;color:#888}
"""
