"""Workers and scheduler in-process: SQLite, a local storage folder, tasks run eagerly (no broker).

One small product is fitted once per module; the tests then score, reschedule and break things around it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from common.db import (
    Job,
    JobStatus,
    ModelStatus,
    ModelVersion,
    Product,
    Result,
    ResultStatus,
    job_summary,
    session_scope,
)
from common.engine.artifact import BANK_FILE, META_FILE, ArtifactError, sha256_file
from common.engine.config import PatchCoreConfig
from common.engine.patchcore import ImageResult, PatchCore
from common.settings import Settings, get_settings, reset_settings_cache
from common.storage import Storage, StorageUnavailable, open_storage
from common.synthetic import nominal_image, plant_defect, png_bytes
from scheduler.adhoc import enqueue_fits, score_images
from scheduler.jobs import enqueue_score, new_score_job, nightly_key
from scheduler.nightly import schedule_nightly, scheduled_day
from scheduler.products import SchedulingError, add_product
from tests.conftest import embedded_default
from totalrecall.jobs_view import format_jobs, format_warnings, load_jobs
from workers.app import FIT_QUEUE, SCORE_QUEUE, celery_config
from workers.fitting import check_validation
from workers.model_cache import ModelCache, get_model_cache
from workers.outputs import heatmap_png, mask_png, output_keys, relative_image_key, safe_key
from workers.tasks import nightly_inspection, score_chunk

SIZE = 96
CONFIG = PatchCoreConfig(image_size=SIZE, coreset_ratio=0.1, holdout_fraction=0.25)
PRODUCT = "part"


@dataclass(frozen=True)
class Embedded:
    home: Path
    store: Storage

    def archive_uri(self, day: date) -> str:
        return self.store.uri_for(f"archive/{day.isoformat()}/{PRODUCT}")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """The embedded default in a temporary home, with product `part` fitted (model v1 active)."""
    home = tmp_path_factory.mktemp("home")
    with embedded_default(home, TOTALRECALL_CHUNK_SIZE="4"):
        store = open_storage(get_settings().storage_url)
        for i in range(16):
            store.put_bytes(f"train/{PRODUCT}/n{i:02d}.png", png_bytes(nominal_image(i, SIZE)))
        add_product(PRODUCT, store.uri_for(f"train/{PRODUCT}"),
                    store.uri_for(f"archive/{{date}}/{PRODUCT}"), CONFIG)
        enqueue_fits([PRODUCT])
        yield Embedded(home, store)


def _write_archive(env: Embedded, day: date, n: int = 8, corrupt: bool = True) -> dict[str, bool]:
    """n images (every 4th with a planted defect), a corrupt PNG and a non-image file; {uri: defective}."""
    folder = f"archive/{day.isoformat()}/{PRODUCT}"
    truth = {}
    for i in range(n):
        image = nominal_image(day.toordinal() + i, SIZE)
        if i % 4 == 1:
            image, _ = plant_defect(image, i)
        truth[env.store.put_bytes(f"{folder}/sub dir/img {i}.png", png_bytes(image))] = i % 4 == 1
    if corrupt:
        env.store.put_bytes(f"{folder}/corrupt.png", b"\x89PNG\r\n\x1a\n truncated")
    env.store.put_bytes(f"{folder}/notes.txt", b"not an image")
    return truth


def _results(job_id: int | None = None, version_id: int | None = None) -> list[Result]:
    with session_scope() as session:
        query = select(Result).order_by(Result.image_uri)
        if job_id is not None:
            query = query.where(Result.job_id == job_id)
        if version_id is not None:
            query = query.where(Result.model_version_id == version_id)
        return list(session.scalars(query))


def _job(job_id: int) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def _job_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job))


def _adhoc_job(version: ModelVersion, images_uri: str, total: int) -> int:
    """A queued score job of `total` images for `version`, made here (its chunks are sent by the test)."""
    with session_scope() as session:
        job = new_score_job(version.product_id, version.id, images_uri, total, enqueued_by="test")
        session.add(job)
        session.flush()
        return job.id


def _active_version() -> ModelVersion:
    with session_scope() as session:
        return session.scalars(select(ModelVersion).where(ModelVersion.is_active)).one()


# --- fit -------------------------------------------------------------------------------------------------


def test_fit_publishes_an_active_verified_version(embedded: Embedded) -> None:
    version = _active_version()
    assert (version.version, version.status, version.is_active) == (1, ModelStatus.READY.value, True)
    folder = f"models/{PRODUCT}/1"
    assert version.artifact_uri == embedded.store.uri_for(folder)
    assert embedded.store.exists(f"{folder}/{BANK_FILE}")
    assert sha256_file(Path(embedded.store.uri_for(f"{folder}/{META_FILE}"))) == version.sha256
    assert version.train_image_count == 12 and version.config["image_size"] == SIZE
    assert len(version.validation["holdout_scores"]) == 4
    assert version.validation["activation"]["passed"] is True
    assert version.image_threshold > 0 and version.pixel_threshold > 0
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.model_version_id == version.id, Job.kind == "fit")).one()
    assert (job.status, job.done, job.failed, job.total, job.error) == ("succeeded", 16, 0, 16, None)


def test_failed_fit_leaves_a_failed_inactive_version(embedded: Embedded) -> None:
    add_product("empty", embedded.store.uri_for("train/empty"), embedded.store.uri_for("a/{date}/e"), CONFIG)
    (scheduled,) = enqueue_fits(["empty"])  # in-process: the task runs (and fails) right here
    assert "no training images under" in scheduled.message
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.kind == "fit").order_by(Job.id.desc())).first()
        version = job.model_version
        assert job.status == JobStatus.FAILED.value and "no training images" in job.error
        assert job.finished_at is not None
        assert (version.status, version.is_active) == (ModelStatus.FAILED.value, False)
        assert "no training images" in version.error


@pytest.mark.parametrize(
    ("stats", "passed", "reason"),
    [
        ({"holdout_images": 4, "failed_images": []}, True, "4 held-out images scored"),
        ({"holdout_images": 0, "failed_images": []}, False, "in-sample"),
        ({"holdout_images": 4, "failed_images": [{}] * 3}, False, "3 of 20 training images failed"),
        ({"holdout_images": 4, "failed_images": [{}] * 2}, True, "2 of 20 failed"),
    ],
)
def test_activation_rule(stats: dict, passed: bool, reason: str) -> None:
    model = PatchCore.__new__(PatchCore)  # only the thresholds are read
    model.image_threshold, model.pixel_threshold = 1.0, 2.0
    ok, text = check_validation(stats, model, 20)
    assert ok is passed and reason in text


# --- nightly and scoring -------------------------------------------------------------------------------------


def test_nightly_records_each_image_once_with_outputs(embedded: Embedded) -> None:
    day = date(2026, 3, 1)
    truth = _write_archive(embedded, day)
    cache = get_model_cache()
    loads_before = cache.stats.loads
    run = schedule_nightly(day)
    (scheduled,) = run.jobs
    assert scheduled.created and scheduled.total == 9 and run.without_model == ["empty"]
    job = _job(scheduled.job_id)
    assert (job.status, job.done, job.failed, job.total) == ("succeeded", 8, 1, 9)
    assert job.idempotency_key == nightly_key(PRODUCT, day, 1) and job.run_date == day
    rows = _results(scheduled.job_id)
    assert len(rows) == 9 and len({r.image_uri for r in rows}) == 9
    failed = [r for r in rows if r.status == ResultStatus.FAILED.value]
    assert [r.image_uri.rsplit("/", 1)[1] for r in failed] == ["corrupt.png"]
    assert failed[0].score is None and "ImageDecodeError" in failed[0].error
    ok = [r for r in rows if r.status == ResultStatus.OK.value]
    for row in ok:
        assert row.captured_date == day and row.threshold == pytest.approx(_active_version().image_threshold)
        if not (row.is_anomalous or row.defect_fraction):  # nothing found: its row only (SAVE_MAPS=findings)
            assert row.mask_uri is None and row.heatmap_uri is None
            continue
        mask = np.asarray(Image.open(row.mask_uri))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
        assert np.asarray(Image.open(row.heatmap_uri)).shape == (SIZE, SIZE)
        assert f"/results/{PRODUCT}/1/{day.isoformat()}/sub_dir/" in row.mask_uri
    assert any(r.is_anomalous for r in ok if truth[r.image_uri])
    saved = {str(p) for p in (embedded.home / "storage/results").rglob(f"{day.isoformat()}/**/*.png")}
    assert saved == {u for r in ok for u in (r.mask_uri, r.heatmap_uri) if u}  # nothing unreferenced
    assert 0 < len(saved) < 2 * len(ok)  # the defects' maps, not the nominal images'
    assert cache.stats.loads - loads_before <= 1  # 3 chunks, one model load


@pytest.mark.parametrize(("policy", "day"), [("all", date(2026, 3, 11)), ("none", date(2026, 3, 12))])
def test_save_maps_all_or_none(embedded: Embedded, monkeypatch: pytest.MonkeyPatch, policy: str,
                               day: date) -> None:
    truth = _write_archive(embedded, day, corrupt=False)
    monkeypatch.setenv("TOTALRECALL_SAVE_MAPS", policy)
    reset_settings_cache()
    try:
        (scheduled,) = schedule_nightly(day).jobs
    finally:
        monkeypatch.delenv("TOTALRECALL_SAVE_MAPS")
        reset_settings_cache()
    rows = [r for r in _results(scheduled.job_id) if r.status == ResultStatus.OK.value]
    assert len(rows) == len(truth) and any(r.is_anomalous for r in rows)
    for row in rows:
        if policy == "none":
            assert row.mask_uri is None and row.heatmap_uri is None and row.score is not None
        else:
            assert np.asarray(Image.open(row.mask_uri)).shape == (SIZE, SIZE)
            assert np.asarray(Image.open(row.heatmap_uri)).shape == (SIZE, SIZE)


def _nightly(day: date, level: str | None = None) -> Job:
    """Schedule (and, in-process, run) the nightly of `day`, with TOTALRECALL_DRIFT_LEVEL=level if given."""
    with pytest.MonkeyPatch.context() as mp:
        if level is not None:
            mp.setenv("TOTALRECALL_DRIFT_LEVEL", level)
        reset_settings_cache()
        try:
            (scheduled,) = schedule_nightly(day).jobs
        finally:
            mp.undo()
            reset_settings_cache()
    return _job(scheduled.job_id)


def test_nightly_records_its_median_score_and_warns_of_score_drift(embedded: Embedded,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    version = _active_version()
    assert version.nominal_median_score == pytest.approx(statistics.median(version.validation["holdout_scores"]))
    steady = date(2026, 4, 1)
    _write_archive(embedded, steady, corrupt=False)  # 8 parts, 2 of them with a defect
    job = _nightly(steady)
    scores = sorted(r.score for r in _results(job.id))
    assert job.status == "succeeded" and job.median_score == pytest.approx(statistics.median(scores))
    assert job.warning is None

    for name, day in (("dark", date(2026, 4, 2)), ("dark, check off", date(2026, 4, 3))):
        for i in range(8):  # the lighting changed: every good part photographed at half the brightness
            image = (nominal_image(day.toordinal() + i, SIZE) * 0.5).astype(np.uint8)
            embedded.store.put_bytes(f"archive/{day.isoformat()}/{PRODUCT}/img {i}.png", png_bytes(image))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="workers.job_state"):
            job = _nightly(day, level="0" if "off" in name else None)
        drift_events = [r.getMessage() for r in caplog.records if "event=score_drift" in r.getMessage()]
        assert job.status == "succeeded" and job.error is None, name
        assert job.median_score > version.image_threshold > version.nominal_median_score, name
        if "off" in name:
            assert job.warning is None and drift_events == []
            continue
        assert job.warning.startswith("score drift: the median image score") and "refit" in job.warning
        assert len(drift_events) == 1 and f"job={job.id}" in drift_events[0]
        with session_scope() as session:  # for SQL users, in the job_summary view
            assert session.execute(select(job_summary.c.warning, job_summary.c.median_score)
                                   .where(job_summary.c.job_id == job.id)).one() == (job.warning, job.median_score)
        views = load_jobs([job.id])
        assert "WARNING score drift" in format_jobs(views) and views[0].median_score == job.median_score
        assert format_warnings(views) == f"job {job.id} ({PRODUCT}): {job.warning}"  # in full, for --wait


def test_a_drifted_job_finished_by_a_recount_logs_score_drift(embedded: Embedded,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Job B's images were half scored by job A first: B's own chunk writes two rows, and the in-process
    settle (as the workers' recovery sweep) recounts B to two images and finishes it: the alert must come."""
    uris = []
    for i in range(4):  # dark parts: a drifted run
        image = (nominal_image(90_000 + i, SIZE) * 0.5).astype(np.uint8)
        uris.append(embedded.store.put_bytes(f"recount/dark {i}.png", png_bytes(image)))
    version = _active_version()
    first = _adhoc_job(version, embedded.store.uri_for("recount"), 2)
    score_chunk.apply(args=(first, uris[:2]))
    second = _adhoc_job(version, embedded.store.uri_for("recount"), 4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.job_state"):
        enqueue_score(second, uris)
    job = _job(second)
    assert (job.status, job.total, job.done) == ("succeeded", 2, 2) and job.warning is not None
    events = [r.getMessage() for r in caplog.records if "event=score_drift" in r.getMessage()]
    assert len(events) == 1 and f"job={second}" in events[0]


def test_second_nightly_for_the_same_date_adds_nothing(embedded: Embedded) -> None:
    day = date(2026, 3, 1)
    before, jobs_before = _results(), _job_count()
    (scheduled,) = schedule_nightly(day).jobs
    assert not scheduled.created and "nothing enqueued" in scheduled.message
    assert _job_count() == jobs_before
    assert [(r.id, r.created_at) for r in _results()] == [(r.id, r.created_at) for r in before]


def test_redelivered_chunk_is_harmless(embedded: Embedded) -> None:
    day = date(2026, 3, 1)
    job_id = schedule_nightly(day).jobs[0].job_id
    before = {r.image_uri: (r.id, r.created_at, r.score) for r in _results(job_id)}
    score_chunk.apply(args=(job_id, sorted(before)))  # the same images again, as after a redelivery
    after = {r.image_uri: (r.id, r.created_at, r.score) for r in _results(job_id)}
    ok_uris = [u for u in before if not u.endswith("corrupt.png")]
    assert {u: after[u] for u in ok_uris} == {u: before[u] for u in ok_uris}  # ok rows untouched
    job = _job(job_id)
    assert (job.status, job.done, job.failed, job.total) == ("succeeded", 8, 1, 9)


def test_racing_schedulers_create_one_job(embedded: Embedded) -> None:
    day = date(2026, 3, 2)
    _write_archive(embedded, day, n=4, corrupt=False)
    outcomes, errors = [], []

    def run() -> None:
        try:
            outcomes.extend(schedule_nightly(day).jobs)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({o.job_id for o in outcomes}) == 1 and sum(o.created for o in outcomes) == 1
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.run_date == day)) == 1
    assert len(_results(outcomes[0].job_id)) == 4


@pytest.mark.parametrize(("now", "at", "day"), [
    ("2026-12-04T02:00+00:00", (2, 0), "2026-12-03"),  # on time
    ("2026-12-04T09:30+00:00", (2, 0), "2026-12-03"),  # late, same day
    ("2026-12-04T01:45+00:00", (2, 0), "2026-12-02"),  # before today's firing: yesterday's, still queued
    ("2026-12-04T01:59:59.990+00:00", (2, 0), "2026-12-03"),  # this worker's clock a little behind beat's
    ("2026-12-04T00:10+00:00", (23, 50), "2026-12-02"),  # fired at 23:50 on the 3rd, ran after midnight
    ("2026-12-04T00:30+00:00", (0, 30), "2026-12-03"),
    ("2026-12-03T23:59:30+00:00", (0, 0), "2026-12-03"),  # sent at 00:00 on the 4th; this clock is behind
    ("2026-12-03T23:58+00:00", (0, 5), "2026-12-03"),
    ("2026-12-03T23:40+00:00", (0, 0), "2026-12-02"),  # 20 min before midnight: the 3rd's firing, queued
    ("2026-12-04T03:00+02:00", (2, 0), "2026-12-02"),  # 01:00 UTC, long before today's 02:00 UTC
])
def test_beat_nightly_inspects_the_day_before_its_scheduled_time(now: str, at: tuple[int, int],
                                                                  day: str) -> None:
    assert scheduled_day(at, datetime.fromisoformat(now)) == date.fromisoformat(day)


def test_nightly_task_without_a_date_inspects_the_scheduled_day(embedded: Embedded,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Scheduled an hour from now: the last firing was yesterday's, so the day before yesterday."""
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    if later.date() != now.date():
        pytest.skip("less than an hour before midnight UTC")
    monkeypatch.setenv("TOTALRECALL_NIGHTLY_AT", f"{later:%H:%M}")
    reset_settings_cache()
    try:
        summary = nightly_inspection.apply().get()
    finally:
        monkeypatch.undo()
        reset_settings_cache()
    assert summary["day"] == (now.date() - timedelta(days=2)).isoformat()


def test_nightly_task_and_an_unlistable_archive(embedded: Embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = nightly_inspection.apply(args=("2026-03-01",)).get()
    assert summary["day"] == "2026-03-01" and summary["without_model"] == ["empty"]
    assert [j["created"] for j in summary["jobs"]] == [False]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # an archive nobody can list
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("TOTALRECALL_S3_MAX_ATTEMPTS", "1")
    with session_scope() as session:
        product = session.scalars(select(Product).where(Product.name == PRODUCT)).one()
        template, product.archive_uri_template = product.archive_uri_template, "s3://bucket/{date}/"
    try:
        run = schedule_nightly(date(2026, 3, 3))
    finally:
        with session_scope() as session:
            session.scalars(select(Product).where(Product.name == PRODUCT)).one().archive_uri_template = template
    assert run.jobs == [] and "cannot reach S3" in run.errors[PRODUCT]
    assert run.retry == [PRODUCT]  # transient: the nightly task runs again (test_faults, with workers)
    retried = schedule_nightly(date(2026, 3, 1), products=["some other product"])  # a retry's scope
    assert retried.jobs == [] and retried.errors == {}


def test_empty_archive_gives_a_succeeded_job_with_zero_images(embedded: Embedded) -> None:
    (scheduled,) = schedule_nightly(date(2001, 1, 1)).jobs
    job = _job(scheduled.job_id)
    assert (job.status, job.total, job.done, job.failed) == ("succeeded", 0, 0, 0)
    assert "no new images" in job.error and job.finished_at is not None


def test_a_nightly_that_found_no_images_does_not_hold_its_date(embedded: Embedded) -> None:
    day = date(2001, 1, 2)
    (empty,) = schedule_nightly(day).jobs
    assert empty.created and empty.total == 0
    truth = _write_archive(embedded, day, n=2, corrupt=False)  # uploaded late
    (late,) = schedule_nightly(day).jobs
    assert late.created and late.job_id != empty.job_id and late.total == 2
    assert sorted(r.image_uri for r in _results(late.job_id)) == sorted(truth)
    assert _job(empty.job_id).idempotency_key is None
    assert _job(late.job_id).idempotency_key == nightly_key(PRODUCT, day, _active_version().version)
    (again,) = schedule_nightly(day).jobs  # a job with images holds the date
    assert not again.created and again.job_id == late.job_id


def test_an_in_process_nightly_left_by_a_stopped_process_gives_its_date_back(embedded: Embedded) -> None:
    """In-process, the command that schedules a night runs it; killed before it finished, it left a queued
    job holding the date. Once nothing has been recorded for it for twice a chunk's hard time limit, the
    next run marks it failed and schedules the date again (it used to answer "already scheduled" for ever),
    and `--wait` on such a job ends (it waited for ever)."""
    from scheduler.jobs import ABANDONED_AFTER_LIMITS
    from totalrecall.jobs_view import wait_for_jobs

    day = date(2026, 5, 1)
    truth = _write_archive(embedded, day, n=2, corrupt=False)
    version = _active_version()
    with session_scope() as session:  # what the killed process left: its job, before its first chunk
        job = new_score_job(version.product_id, version.id, embedded.archive_uri(day), 2, run_date=day,
                            enqueued_by="nightly", key=nightly_key(PRODUCT, day, version.version))
        session.add(job)
        session.flush()
        stuck = job.id
    (recent,) = schedule_nightly(day).jobs  # just created: its process may still be running it
    assert not recent.created and recent.job_id == stuck and _job(stuck).status == "queued"
    quiet = ABANDONED_AFTER_LIMITS * get_settings().score_time_limits[1]
    with session_scope() as session:
        session.get(Job, stuck).created_at -= timedelta(seconds=quiet - 60)
    (recent,) = schedule_nightly(day).jobs  # quiet for less than the limit: still held
    assert not recent.created and _job(stuck).status == "queued"
    with session_scope() as session:
        session.get(Job, stuck).created_at -= timedelta(seconds=61)
    (again,) = schedule_nightly(day).jobs
    assert again.created and again.job_id != stuck and _job(again.job_id).status == "succeeded"
    assert sorted(r.image_uri for r in _results(again.job_id)) == sorted(truth)
    left = _job(stuck)
    assert left.status == "failed" and left.error.startswith("abandoned") and left.idempotency_key is None
    waited = _adhoc_job(version, embedded.archive_uri(day), 2)  # another command's, left the same way
    with session_scope() as session:
        session.get(Job, waited).created_at -= timedelta(seconds=quiet + 1)
    (view,) = wait_for_jobs([waited], poll_seconds=0.01, settle_every=3)  # ends: it was abandoned
    assert view.status == "failed" and view.error.startswith("abandoned")


def test_a_broken_model_fails_its_product_only_and_its_date_is_retried(embedded: Embedded) -> None:
    import shutil

    add_product("aaa", embedded.store.uri_for(f"train/{PRODUCT}"), embedded.store.uri_for("archive/{date}/aaa"),
                CONFIG)  # sorted before "part": its failure must not stop the nightly
    enqueue_fits(["aaa"])
    day = date(2026, 4, 1)
    _write_archive(embedded, day, n=2, corrupt=False)
    embedded.store.put_bytes(f"archive/{day.isoformat()}/aaa/a.png", png_bytes(nominal_image(5, SIZE)))
    with session_scope() as session:
        version = session.scalars(select(ModelVersion).join(ModelVersion.product)
                                  .where(Product.name == "aaa", ModelVersion.is_active)).one()
        version_id, folder = version.id, Path(version.artifact_uri)
    shutil.rmtree(folder)  # the active model's artifact is gone
    try:
        first = schedule_nightly(day)
        assert [j.product for j in first.jobs] == [PRODUCT] and _job(first.jobs[0].job_id).status == "succeeded"
        assert "aaa" in first.errors and "ModelUnusable" in first.errors["aaa"]
        with session_scope() as session:
            failed = session.scalars(select(Job).where(Job.model_version_id == version_id, Job.kind == "score")).one()
            failed_id = failed.id
        assert failed.status == "failed" and failed.idempotency_key is not None
        second = schedule_nightly(day)  # the failed job gives up its date: scheduled (and failing) again
        assert "ModelUnusable" in second.errors["aaa"] and not second.jobs[0].created
        with session_scope() as session:
            jobs = session.scalars(select(Job).where(Job.model_version_id == version_id, Job.kind == "score")
                                  .order_by(Job.id)).all()
        assert len(jobs) == 2 and jobs[0].id == failed_id
        assert jobs[0].idempotency_key is None and jobs[1].status == "failed"
    finally:
        with session_scope() as session:  # the other tests expect one product with a model
            session.get(ModelVersion, version_id).is_active = False


def test_a_night_scored_ad_hoc_before_its_nightly_gets_its_date(embedded: Embedded) -> None:
    day = date(2026, 6, 2)
    _write_archive(embedded, day, n=3, corrupt=False)
    adhoc = score_images(PRODUCT, embedded.archive_uri(day))  # during the day, before the nightly
    assert {r.captured_date for r in _results(adhoc.job_id)} == {None}
    (nightly,) = schedule_nightly(day).jobs
    assert nightly.total == 0 and nightly.skipped == 3  # nothing scored twice
    rows = _results(adhoc.job_id)
    assert len(rows) == 3 and {r.captured_date for r in rows} == {day}  # in the night's history


def test_adhoc_scoring_skips_ok_images_and_retries_failed_ones(embedded: Embedded) -> None:
    day = date(2026, 3, 1)
    folder = embedded.archive_uri(day)
    (nightly,) = {r.job_id for r in _results() if r.image_uri.startswith(folder)}
    before = _job(nightly)
    assert (before.status, before.done, before.failed, before.total) == ("succeeded", 8, 1, 9)
    embedded.store.put_bytes(f"archive/{day.isoformat()}/{PRODUCT}/corrupt.png",
                             png_bytes(nominal_image(99, SIZE)))  # repaired
    scheduled = score_images(PRODUCT, folder)
    assert (scheduled.total, scheduled.skipped) == (1, 8)
    job = _job(scheduled.job_id)
    assert (job.status, job.done, job.failed, job.total) == ("succeeded", 1, 0, 1)
    after = _job(nightly)  # the image moved to the new job: the nightly's counts are those of its rows
    assert (after.status, after.done, after.failed, after.total) == ("succeeded", 8, 0, 8)
    assert (after.finished_at, after.median_score) == (before.finished_at, before.median_score)
    (view,) = load_jobs([nightly])
    assert (view.total, view.done, view.failed) == (8, 8, 0)  # what `totalrecall jobs` shows
    (row,) = _results(scheduled.job_id)
    assert row.image_uri.endswith("corrupt.png") and row.status == "ok"
    assert row.captured_date == day  # still in its night's history, although an ad-hoc job scored it
    assert f"/job-{scheduled.job_id}/corrupt.png_mask.png" in row.mask_uri
    again = score_images(PRODUCT, folder)
    assert again.total == 0 and _job(again.job_id).status == "succeeded"


def test_a_nightly_whose_failed_images_were_all_scored_again_keeps_its_date(embedded: Embedded) -> None:
    """A night whose one image failed, then was repaired and scored ad hoc: the image moved to the ad-hoc
    job and the nightly job has no image left. Its night was inspected, so it keeps its date (it used to
    give it back like a night that found nothing, and the next run made an empty job)."""
    day = date(2026, 5, 2)
    _write_archive(embedded, day, n=0)  # a corrupt PNG only
    (nightly,) = schedule_nightly(day).jobs
    assert (_job(nightly.job_id).total, _job(nightly.job_id).failed) == (1, 1)
    embedded.store.put_bytes(f"archive/{day.isoformat()}/{PRODUCT}/corrupt.png", png_bytes(nominal_image(98, SIZE)))
    adhoc = score_images(PRODUCT, embedded.archive_uri(day))
    assert _job(adhoc.job_id).done == 1 and _job(nightly.job_id).total == 0
    jobs = _job_count()
    (again,) = schedule_nightly(day).jobs
    assert not again.created and again.job_id == nightly.job_id and _job_count() == jobs


def test_in_process_job_whose_images_another_job_scored_first_finishes(embedded: Embedded) -> None:
    """Two `totalrecall score` commands on one folder at once (embedded mode): the job whose rows lost
    the race (the images have the other job's results) still finishes, instead of running for ever."""
    version = _active_version()
    uris = [embedded.store.put_bytes(f"overlap/{i}.png", png_bytes(nominal_image(300 + i, SIZE)))
            for i in range(3)]
    folder = embedded.store.uri_for("overlap")
    second = _adhoc_job(version, folder, 3)  # scheduled while the first had not written its rows yet
    first = score_images(PRODUCT, folder)
    assert first.total == 3 and _job(first.job_id).status == "succeeded"
    enqueue_score(second, uris)
    job = _job(second)
    assert (job.status, job.done, job.failed, job.total) == ("succeeded", 0, 0, 0)
    assert {r.image_uri for r in _results(first.job_id)} == set(uris)


def test_two_jobs_taking_failed_images_of_one_job_at_once_leave_its_counts_right(
        embedded: Embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chunks (of two jobs) replace failed results of one earlier job at the same moment: each takes
    the job's lock before reading what it moves, so neither reads a total the other is changing (SQLite
    has no row locks: `lock_job` writes first there). Each chunk waits up to 2 s for the other after
    reading; without the lock both read the same total and one decrement is lost."""
    from workers import job_state

    version = _active_version()
    earlier, first, second = (_adhoc_job(version, "race/", total) for total in (3, 1, 1))

    def row(job_id: int, name: str, status: str) -> dict:
        return {"job_id": job_id, "model_version_id": version.id, "product_id": version.product_id,
                "image_uri": f"race/{name}.png", "status": status,
                "score": 1.0 if status == "ok" else None, "error": "broken" if status == "failed" else None}

    job_state.record_chunk(earlier, [row(earlier, "x1", "failed"), row(earlier, "x2", "failed"),
                                     row(earlier, "y", "ok")])
    meeting = threading.Barrier(2)
    read_moves = job_state.superseded_failures

    def read_then_meet(*args: object) -> dict[int, int]:
        moved = read_moves(*args)
        with contextlib.suppress(threading.BrokenBarrierError):  # the other chunk waits for our lock
            meeting.wait(timeout=2)
        return moved

    monkeypatch.setattr(job_state, "superseded_failures", read_then_meet)
    chunks = [threading.Thread(target=job_state.record_chunk, args=(job, [row(job, name, "ok")]))
              for job, name in ((first, "x1"), (second, "x2"))]
    for chunk in chunks:
        chunk.start()
    for chunk in chunks:
        chunk.join()
    counts = {job: (j.status, j.total, j.done, j.failed) for job in (earlier, first, second)
              for j in [_job(job)]}
    assert counts == {earlier: ("succeeded", 1, 1, 0), first: ("succeeded", 1, 1, 0),
                      second: ("succeeded", 1, 1, 0)}


def test_a_finished_job_does_not_take_back_an_image_another_job_took(embedded: Embedded) -> None:
    """Job A failed image x, and a later job B scored x again (x moved to B, A's total dropped). A chunk of A
    delivered again (its worker died after committing, before acknowledging) used to move x back: A then
    counted 1 ok + 1 failed of total 1 and B 0 of total 0. A finished job takes nothing back."""
    from workers import job_state

    version = _active_version()
    a, b = _adhoc_job(version, "pingpong/", 2), _adhoc_job(version, "pingpong/", 1)

    def row(job_id: int, name: str, status: str) -> dict:
        return {"job_id": job_id, "model_version_id": version.id, "product_id": version.product_id,
                "image_uri": f"pingpong/{name}.png", "status": status,
                "score": 1.0 if status == "ok" else None, "error": "broken" if status == "failed" else None}

    job_state.record_chunk(a, [row(a, "x", "failed"), row(a, "y", "ok")])
    job_state.record_chunk(b, [row(b, "x", "failed")])  # x fails again, now B's
    job_state.record_chunk(a, [row(a, "x", "failed"), row(a, "y", "ok")])  # A's chunk redelivered
    counts = {job: (j.status, j.total, j.done, j.failed) for job in (a, b) for j in [_job(job)]}
    assert counts == {a: ("succeeded", 1, 1, 0), b: ("succeeded", 1, 0, 1)}
    assert {r.image_uri: r.job_id for r in _results() if r.image_uri.startswith("pingpong/")} == {
        "pingpong/x.png": b, "pingpong/y.png": a}


def test_failure_listings_escape_control_characters(embedded: Embedded) -> None:
    """An archive file name with a terminal escape or a newline restyled the terminal or forged a line in
    `totalrecall jobs N` and `--wait` (the table escaped them, the failure list did not)."""
    from totalrecall.jobs_view import format_failures
    from workers import job_state

    version = _active_version()
    job = _adhoc_job(version, "odd/", 1)
    job_state.record_chunk(job, [{"job_id": job, "model_version_id": version.id, "product_id": version.product_id,
                                  "image_uri": "odd/a\x1b[31mRED\nfake: line.png", "status": "failed",
                                  "score": None, "error": "ImageDecodeError: bad\rline"}])
    text = format_failures(job)
    assert "\x1b" not in text and "\r" not in text and len(text.splitlines()) == 2
    assert "odd/a\\x1b[31mRED\\nfake: line.png: ImageDecodeError: bad\\rline" in text


def test_a_job_completing_while_it_is_marked_failed_ends_succeeded(embedded: Embedded,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`mark_failed` reads the job, then writes; a chunk that completes the job in between must not be
    overwritten with `failed` (a succeeded job is never marked failed). On SQLite the read takes the
    write lock first (`locked_job`), so the chunk waits and completes the job after: succeeded."""
    from workers import job_state

    version = _active_version()
    job_id = _adhoc_job(version, "race-fail/", 1)
    read = threading.Event()
    real_utcnow = job_state.utcnow

    def utcnow_after_the_chunk():  # called by mark_failed between its read and its write
        read.set()
        time.sleep(1.5)  # the chunk commits here, unless it waits for our lock
        return real_utcnow()

    def chunk() -> None:
        read.wait(10)
        job_state.record_chunk(job_id, [{"job_id": job_id, "model_version_id": version.id,
                                         "product_id": version.product_id, "image_uri": "race-fail/a.png",
                                         "status": "ok", "score": 1.0}])

    monkeypatch.setattr(job_state, "utcnow", utcnow_after_the_chunk)
    other = threading.Thread(target=chunk)
    other.start()
    job_state.mark_failed(job_id, "a late failure")
    monkeypatch.setattr(job_state, "utcnow", real_utcnow)
    other.join(60)
    job = _job(job_id)
    assert (job.status, job.done, job.total, job.error) == ("succeeded", 1, 1, None)


def test_missing_image_is_a_failed_row_and_the_rest_goes_on(embedded: Embedded) -> None:
    version = _active_version()
    good = embedded.store.put_bytes("adhoc/good.png", png_bytes(nominal_image(7, SIZE)))
    missing = embedded.store.uri_for("adhoc/missing.png")
    job_id = _adhoc_job(version, embedded.store.uri_for("adhoc"), 2)
    score_chunk.apply(args=(job_id, [missing, good]))
    rows = {r.image_uri: r for r in _results(job_id)}
    assert rows[good].status == "ok" and rows[missing].status == "failed"
    assert rows[missing].error.startswith("StorageNotFound: no object at")
    job = _job(job_id)
    assert (job.status, job.done, job.failed) == ("succeeded", 1, 1)


def test_soft_time_limit_while_writing_rows_fails_the_images_not_the_job(embedded: Embedded,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from workers import scoring

    version = _active_version()
    uris = [embedded.store.put_bytes(f"adhoc/soft/{i}.png", png_bytes(nominal_image(70 + i, SIZE))) for i in range(2)]
    job_id = _adhoc_job(version, embedded.store.uri_for("adhoc/soft"), 2)
    real, calls = scoring.record_chunk, []

    def limit_on_first_write(*args: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise SoftTimeLimitExceeded()  # the limit fires while the chunk's rows are being written
        real(*args)

    monkeypatch.setattr(scoring, "record_chunk", limit_on_first_write)
    score_chunk.apply(args=(job_id, uris))
    rows = _results(job_id)
    assert [r.image_uri for r in rows] == sorted(uris) and all(r.status == "failed" for r in rows)
    assert all("soft time limit" in r.error for r in rows)
    job = _job(job_id)
    assert (job.status, job.done, job.failed) == ("succeeded", 0, 2)


def test_unreachable_storage_fails_the_job_in_process(embedded: Embedded,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("TOTALRECALL_S3_MAX_ATTEMPTS", "1")
    version = _active_version()
    job_id = _adhoc_job(version, "s3://bucket/in", 1)
    with pytest.raises(StorageUnavailable):
        score_chunk.apply(args=(job_id, ["s3://bucket/in/a.png"]))  # in-process: no broker to retry on
    job = _job(job_id)
    assert job.status == "failed" and job.error.startswith("StorageUnavailable: cannot reach S3")
    assert _results(job_id) == []


def test_a_worker_out_of_disk_for_the_model_is_retried_not_blamed_on_the_model(
        embedded: Embedded, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A worker whose model cache disk is full could not load the model: the chunk is retried (with a
    broker, on any worker) instead of failing the job as "model cannot be used"."""
    import errno

    from common.storage import LocalStorage
    from workers.job_state import WorkerShortOfResources
    from workers.model_cache import reset_model_cache
    from workers.scoring import ModelUnusable, load_context, load_model
    from workers.tasks import is_transient

    def disk_full(self, key, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    version = _active_version()
    job_id = _adhoc_job(version, embedded.archive_uri(date(2026, 3, 1)), 1)
    monkeypatch.setenv("TOTALRECALL_CACHE_DIR", str(tmp_path / "cache"))  # no copy on this worker's disk yet
    reset_settings_cache()
    reset_model_cache()
    monkeypatch.setattr(LocalStorage, "get_file", disk_full)
    try:
        with pytest.raises(WorkerShortOfResources, match="could not load model version 1 of 'part'.*No space") as info:
            load_model(load_context(job_id))
        assert is_transient(info.value) and not isinstance(info.value, ModelUnusable)
        with pytest.raises(WorkerShortOfResources):  # in-process: no broker to retry on, the job says why
            score_chunk.apply(args=(job_id, [embedded.store.uri_for("archive/x.png")]))
        job = _job(job_id)
        assert job.status == "failed" and job.error.startswith("WorkerShortOfResources: this worker (")
    finally:
        monkeypatch.undo()
        reset_settings_cache()
        reset_model_cache()


def test_unknown_product_or_no_active_model_enqueues_nothing(embedded: Embedded) -> None:
    jobs_before = _job_count()
    with pytest.raises(SchedulingError, match="unknown product 'nope'"):
        score_images("nope", embedded.store.uri_for("adhoc"))
    add_product("idle", embedded.store.uri_for("train/idle"), embedded.store.uri_for("a/{date}/i"), CONFIG)
    with pytest.raises(SchedulingError, match="'idle' has no active model"):
        score_images("idle", embedded.store.uri_for("adhoc"))
    with pytest.raises(SchedulingError, match="unknown product 'nope'"):
        enqueue_fits([PRODUCT, "nope"])
    assert _job_count() == jobs_before


@pytest.mark.parametrize(
    ("name", "template", "match"),
    [("bad name", "/a/{date}", "invalid product name"), ("ok", "/a/b", "must contain {date}"),
     (PRODUCT, "/a/{date}", "already exists")],
)
def test_product_registration_is_validated(embedded: Embedded, name: str, template: str, match: str) -> None:
    with pytest.raises(SchedulingError, match=match):
        add_product(name, "/train", template, CONFIG)


# --- model cache ---------------------------------------------------------------------------------------------


def _second_artifact(env: Embedded, tmp_path: Path) -> tuple[str, str]:
    """A different (smaller-bank) artifact of the same product, published to storage: (sha256, uri)."""
    version = _active_version()
    model = PatchCore.load(Path(version.artifact_uri), version.sha256)
    model.set_bank(model.index.bank[: len(model.index.bank) // 2].copy())
    sha = model.save(tmp_path / "b")
    for name in (BANK_FILE, META_FILE):
        env.store.put_file(f"models/{PRODUCT}/half/{name}", tmp_path / "b" / name)
    return sha, env.store.uri_for(f"models/{PRODUCT}/half")


def test_model_cache_is_lru_bounded_by_bank_bytes_and_reuses_disk(embedded: Embedded, tmp_path: Path) -> None:
    version = _active_version()
    a = (version.sha256, version.artifact_uri)
    b = _second_artifact(embedded, tmp_path)
    bank_a = PatchCore.load(Path(version.artifact_uri), version.sha256).index.bank.nbytes
    cache = ModelCache(tmp_path / "cache", max_bytes=bank_a)  # room for one model only
    model_a = cache.get(*a)
    assert cache.get(*a) is model_a
    assert (cache.stats.loads, cache.stats.hits, cache.stats.downloads) == (1, 1, 1)
    cache.get(*b)
    assert cache.cached() == [b[0]] and cache.stats.evictions == 1 and cache.bytes_used <= bank_a
    cache.get(*a)  # evicted from memory, still on disk: loaded again without a download
    assert (cache.stats.loads, cache.stats.downloads) == (3, 2)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([a[0], b[0]])


def test_model_cache_refetches_a_damaged_disk_copy_and_rejects_a_wrong_hash(embedded: Embedded,
                                                                            tmp_path: Path) -> None:
    version = _active_version()
    cache = ModelCache(tmp_path / "cache", max_bytes=1 << 30)
    cache.get(version.sha256, version.artifact_uri)
    bank = tmp_path / "cache" / version.sha256 / BANK_FILE
    bank.write_bytes(bank.read_bytes()[:-8] + b"corrupt!")
    cache.clear()
    cache.get(version.sha256, version.artifact_uri)
    assert cache.stats.downloads == 2
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        cache.get("0" * 64, version.artifact_uri)


def test_model_cache_loads_once_under_concurrent_requests(embedded: Embedded, tmp_path: Path) -> None:
    version = _active_version()
    cache = ModelCache(tmp_path / "cache", max_bytes=1 << 30)
    models = []
    threads = [threading.Thread(target=lambda: models.append(cache.get(version.sha256, version.artifact_uri)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in models}) == 1 and cache.stats.loads == 1 and cache.stats.hits == 3


# --- outputs and configuration ----------------------------------------------------------------------------------


def test_output_keys_are_safe_readable_and_unique() -> None:
    assert relative_image_key("s3://b/arch/2026-01-01/p/x/a.png", "s3://b/arch/2026-01-01/p/") == "x/a.png"
    assert relative_image_key("s3://b/elsewhere/a.png", "s3://b/arch/") == "elsewhere/a.png"
    assert safe_key("x/a.png") == "x/a.png"
    assert safe_key("x y/a.png").startswith("x_y/a.png~") and safe_key("x y/a.png") != safe_key("x_y/a.png")
    assert safe_key("../a.png").startswith("_/a.png~")
    mask, heatmap = output_keys("p", 3, "2026-01-01", "/data/in/a b.png", "/data/in")
    assert mask.startswith("results/p/3/2026-01-01/a_b.png~") and mask.endswith("_mask.png")
    assert heatmap == mask.replace("_mask.png", "_heatmap.png")
    long_a, long_b = "d" * 300 + "/" + "n" * 240 + "a.png", "d" * 300 + "/" + "n" * 240 + "b.png"
    keys = [output_keys("p", 3, "2026-01-01", f"/in/{name}", "/in")[1] for name in (long_a, long_b)]
    assert keys[0] != keys[1]  # cut to the same length, told apart by the hash of the whole key
    assert all(len(segment.encode()) <= 255 for key in keys for segment in key.split("/"))
    deep = ["/".join(["folder" * 30] * 8 + [name]) for name in ("a.png", "b.png")]  # 1,450 characters each
    keys = [output_keys("p", 3, "2026-01-01", f"/in/{name}", "/in")[1] for name in deep]
    assert keys[0] != keys[1] and all(len(k.encode()) < 1024 for k in keys)  # S3's key limit (the job failed)
    assert keys[0].endswith("/a.png~" + keys[0].split("~")[-1]) and keys[0].count("/") == 5


def test_mask_and_heatmap_cover_the_original_image() -> None:
    amap = np.full((4, 6), 1.0, dtype=np.float32)
    amap[1, 2] = 4.0
    result = ImageResult(score=1.0, anomaly_map=amap, mask=amap >= 2.0, box=(2, 1, 4, 6), image_hw=(8, 8))
    mask = np.asarray(Image.open(io.BytesIO(mask_png(result))))
    assert mask.shape == (8, 8) and mask[3, 3] == 255 and mask.sum() == 255
    heat = np.asarray(Image.open(io.BytesIO(heatmap_png(result, pixel_threshold=2.0))))
    assert heat.shape == (8, 8) and heat[2, 1] == 64 and heat[3, 3] == 255 and heat[0, 0] == 0


def test_celery_configuration(tmp_path: Path) -> None:
    embedded_conf = celery_config(Settings.from_env({"TOTALRECALL_HOME": str(tmp_path)}))
    assert embedded_conf["task_always_eager"] and embedded_conf["task_eager_propagates"]
    conf = celery_config(Settings.from_env({
        "TOTALRECALL_BROKER_URL": "redis://localhost:6379/0", "TOTALRECALL_NIGHTLY_AT": "3:15",
        "TOTALRECALL_VISIBILITY_TIMEOUT": "600", "TOTALRECALL_SCORE_SOFT_TIME_LIMIT": "60",
        "TOTALRECALL_SCORE_TIME_LIMIT": "90"}))
    assert not conf["task_always_eager"] and conf["broker_url"] == "redis://localhost:6379/0"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"] and conf["task_ignore_result"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["broker_connection_retry_on_startup"]
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["broker_transport_options"]["visibility_timeout"] == 600
    assert {q.name: q.routing_key for q in conf["task_queues"]} == {FIT_QUEUE: FIT_QUEUE, SCORE_QUEUE: SCORE_QUEUE}
    assert conf["task_routes"]["workers.tasks.fit_product"]["queue"] == FIT_QUEUE
    assert conf["task_annotations"]["workers.tasks.score_chunk"] == {"soft_time_limit": 60, "time_limit": 90}
    schedule = conf["beat_schedule"]["nightly-inspection"]
    assert schedule["task"] == "workers.tasks.nightly_inspection"
    assert schedule["schedule"].hour == {3} and schedule["schedule"].minute == {15}
