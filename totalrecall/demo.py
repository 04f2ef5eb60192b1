"""`totalrecall demo`: the whole pipeline on generated parts, embedded (SQLite, local folder, in-process).

It generates nominal training images and, for yesterday (UTC), an archive in which every fourth part has
a planted scratch or stain (the planted masks are kept aside under `<home>/truth/`, outside the storage
the system reads) plus one deliberately truncated file, registers product `demo-part`, fits it, runs the
nightly inspection for that date, and compares the verdicts with the planted truth.

Everything is deterministic and idempotent: running it again for the same date finds the product, its
active model and the nightly job already there and adds nothing.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from sqlalchemy import select

from common.db import Job, JobKind, Result, ResultStatus, session_scope
from common.drift import drift_level
from common.engine.config import PatchCoreConfig
from common.engine.metrics import image_auroc
from common.settings import PREFIX, get_settings, reset_settings_cache
from common.storage import Storage, open_storage
from common.synthetic import mask_png_bytes, nominal_image, plant_defect, png_bytes

PRODUCT = "demo-part"
IMAGE_SIZE = 160
TRAIN_IMAGES = 60
DEFECT_EVERY = 4  # every 4th archive image has a planted defect (25 %)
# 12 held-out nominal images calibrate the threshold (with 4, a tight threshold raises false alarms).
CONFIG = PatchCoreConfig(image_size=IMAGE_SIZE, coreset_ratio=0.1, holdout_fraction=0.2)
# Settings that would point the demo at real services; it always runs embedded.
SERVICE_VARIABLES = ("DATABASE_URL", "BROKER_URL", "STORAGE_URL", "CACHE_DIR")
HISTORY_SQL = ("SELECT captured_date, image_uri, round(score, 3) AS score, round(threshold, 3) AS threshold "
               "FROM anomaly_history WHERE verdict = 'anomalous' ORDER BY score DESC")


@dataclass(frozen=True)
class Summary:
    version: int
    images: int
    anomalous: int
    failed: int
    planted: int
    planted_found: int
    false_alarms: int
    auroc: float
    drift: float | None  # the night's score-drift level (common.drift), None without a reference
    warning: str | None
    not_inspected: int = 0  # archive images written after the night was inspected (a larger --images)


def run_demo(home: str | None = None, n_images: int = 40) -> int:
    if n_images < DEFECT_EVERY:
        raise ValueError(f"--images must be at least {DEFECT_EVERY}")
    _use_embedded_settings(home)
    from common.migrate import upgrade
    from scheduler.nightly import schedule_nightly, yesterday_utc

    settings = get_settings()
    day = yesterday_utc()
    timings: dict[str, float] = {}
    print(f"TotalRecall demo in {settings.home} (SQLite, local storage, tasks in-process)")

    started = time.perf_counter()
    upgrade()
    store = open_storage(settings.storage_url)
    truth = _write_dataset(store, settings.home / "truth", day, n_images)
    timings["generate images"] = time.perf_counter() - started

    started = time.perf_counter()
    _fit_if_needed(store)
    timings["fit"] = time.perf_counter() - started

    started = time.perf_counter()
    run = schedule_nightly(day, enqueued_by="demo")
    timings["nightly inspection"] = time.perf_counter() - started
    for job in run.jobs:
        if job.created:
            print(f"nightly {day}: job {job.job_id} inspected {job.total} image(s)")
        else:
            print(f"nightly {day}: {job.message} (idempotent no-op: no new rows)")
    for product, error in run.errors.items():
        print(f"nightly {day}: {product} not scheduled: {error}")

    summary = _summarise(day, truth)
    if summary.not_inspected:
        print(f"{summary.not_inspected} archive image(s) written after the night was inspected are not counted "
              "(the night's job holds its date): run the demo in a new --home to inspect them all")
    _print_summary(summary, timings, settings.home, day)
    return 1 if run.errors else 0


def _use_embedded_settings(home: str | None) -> None:
    """Point this process at the embedded default, whatever service settings the environment has."""
    ignored = [PREFIX + name for name in SERVICE_VARIABLES if os.environ.pop(PREFIX + name, None)]
    if ignored:
        print(f"demo runs embedded: ignoring {', '.join(ignored)}")
    if home:
        os.environ[PREFIX + "HOME"] = str(Path(home).expanduser().absolute())
    reset_settings_cache()
    from workers.app import app, configure
    from workers.model_cache import reset_model_cache

    configure(app)
    reset_model_cache()


def _write_dataset(store: Storage, truth_dir: Path, day: date, n_images: int) -> dict[str, bool]:
    """Training and archive images (written once; deterministic); returns {archive image URI: defective}."""
    for i in range(TRAIN_IMAGES):
        _put_once(store, f"train/{PRODUCT}/nominal-{i:03d}.png",
                  lambda i=i: png_bytes(nominal_image(i, IMAGE_SIZE)))
    truth: dict[str, bool] = {}
    day_seed = day.toordinal() * 1000
    folder = f"archive/{day.isoformat()}/{PRODUCT}"
    for i in range(n_images):
        name = f"part-{i:04d}"
        image = nominal_image(day_seed + i, IMAGE_SIZE)
        defective = i % DEFECT_EVERY == 1
        if defective:
            image, mask = plant_defect(image, day_seed + i)
            mask_path = truth_dir / day.isoformat() / f"{name}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            mask_path.write_bytes(mask_png_bytes(mask))
        key = f"{folder}/{name}.png"
        _put_once(store, key, lambda image=image: png_bytes(image))
        truth[store.uri_for(key)] = defective
    broken = f"{folder}/part-9999-truncated.png"  # shows how a failed image is recorded
    _put_once(store, broken, lambda: png_bytes(nominal_image(0, IMAGE_SIZE))[:200])
    return truth


def _put_once(store: Storage, key: str, data: Callable[[], bytes]) -> None:
    if not store.exists(key):
        store.put_bytes(key, data())


def _fit_if_needed(store: Storage) -> None:
    from scheduler.adhoc import enqueue_fits
    from scheduler.products import SchedulingError, add_product, list_products

    existing = {p.name: p for p in list_products()}
    if PRODUCT not in existing:
        add_product(PRODUCT, store.uri_for(f"train/{PRODUCT}"),
                    store.uri_for(f"archive/{{date}}/{PRODUCT}"), CONFIG)
        print(f"registered product {PRODUCT!r}")
    elif existing[PRODUCT].active_version is not None:
        print(f"product {PRODUCT!r} already has active model v{existing[PRODUCT].active_version}: not refitting")
        return
    (job,) = enqueue_fits([PRODUCT], enqueued_by="demo")
    version = {p.name: p for p in list_products()}[PRODUCT].active_version
    if version is None:
        raise SchedulingError(f"fit job {job.job_id} did not activate a model: see `totalrecall jobs {job.job_id}`")
    print(f"fitted {PRODUCT!r} on {TRAIN_IMAGES} images: model v{version} active (job {job.job_id})")


def _summarise(day: date, truth: dict[str, bool]) -> Summary:
    from scheduler.products import active_version, get_product

    with session_scope() as session:
        product = get_product(session, PRODUCT)
        version = active_version(session, product)
        rows = session.execute(
            select(Result.image_uri, Result.status, Result.score, Result.is_anomalous).where(
                Result.product_id == product.id, Result.model_version_id == version.id,
                Result.captured_date == day)
        ).all()
        night = session.scalars(select(Job).where(Job.product_id == product.id, Job.kind == JobKind.SCORE.value,
                                                  Job.run_date == day).order_by(Job.id.desc())).first()
        drift = None
        if night and night.median_score is not None and version.nominal_median_score is not None:
            drift = drift_level(night.median_score, version.nominal_median_score, version.image_threshold)
        warning = night.warning if night else None
    ok = [r for r in rows if r.status == ResultStatus.OK.value and r.image_uri in truth]
    labels = [truth[r.image_uri] for r in ok]
    inspected = {r.image_uri for r in rows}
    return Summary(
        version=version.version,
        images=len(rows),
        anomalous=sum(bool(r.is_anomalous) for r in rows),
        failed=sum(r.status == ResultStatus.FAILED.value for r in rows),
        planted=sum(defective for uri, defective in truth.items() if uri in inspected),
        planted_found=sum(bool(r.is_anomalous) and truth[r.image_uri] for r in ok),
        false_alarms=sum(bool(r.is_anomalous) and not truth[r.image_uri] for r in ok),
        auroc=image_auroc([r.score for r in ok], labels) if 0 < sum(labels) < len(labels) else float("nan"),
        drift=drift,
        warning=warning,
        not_inspected=sum(uri not in inspected for uri in truth),
    )


def _print_summary(s: Summary, timings: dict[str, float], home: Path, day: date) -> None:
    from totalrecall.jobs_view import format_table

    rows = [
        ["images inspected", s.images],
        ["anomalies found", f"{s.anomalous} ({s.planted_found} of {s.planted} planted defects, "
                            f"{s.false_alarms} false alarms)"],
        ["failures", f"{s.failed} (a deliberately truncated file: see `totalrecall jobs`)"],
        ["image AUROC vs planted truth", f"{s.auroc:.3f}"],
        ["score drift of the night", "not measured" if s.drift is None else
         f"level {s.drift:.2f} (warning from {get_settings().drift_level:g}): "
         + ("WARNING, see `totalrecall jobs`" if s.warning else "none")],
    ] + [[f"time: {stage}", f"{seconds:.1f} s"] for stage, seconds in timings.items()]
    print()
    print(format_table(["demo summary", ""], rows))
    print()
    print(f"masks and heatmaps of the flagged images: "
          f"{home / 'storage' / 'results' / PRODUCT / str(s.version) / day.isoformat()}/")
    print(f"planted truth masks: {home / 'truth' / day.isoformat()}/")
    print("query the history:")
    print(f'  sqlite3 {shlex.quote(str(home / "totalrecall.db"))} "{HISTORY_SQL}"')
