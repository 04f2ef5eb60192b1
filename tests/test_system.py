"""The distributed system end to end: PostgreSQL, Redis, S3 (moto) and a real `totalrecall worker` process.

The tests run in file order and build on each other (fit, then nightly, then the same nightly again ...),
driving everything through the `totalrecall` command line as an operator would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError

from common.db import Job, ModelVersion, Product, Result, session_scope
from common.engine.metrics import image_auroc
from common.migrate import create_readonly_login, readonly_url
from common.synthetic import nominal_image, plant_defect, png_bytes
from tests.conftest import Services

pytestmark = pytest.mark.integration

SIZE = 128
PRODUCTS = {"widget": 0, "gadget": 500}  # name -> seed offset
TRAIN, ARCHIVE = 20, 12
DAY = date(2026, 5, 4)
EMPTY_DAY = date(2001, 1, 1)


@dataclass
class System:
    env: dict[str, str]
    pg_url: str
    bucket: str
    s3: object  # boto3 S3 client
    redis: object  # redis.Redis
    worker_log: Path
    worker_pid: int
    truth: dict[str, bool]  # archive image URI -> planted defect

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "totalrecall.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"


@pytest.fixture(scope="module")
def system(services: Services, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    import boto3
    import redis

    tmp = tmp_path_factory.mktemp("system")
    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    bucket = f"tr-system-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    broker = redis.Redis.from_url(services.redis_url)
    broker.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOTALRECALL_", "AWS_"))}
    env.update({
        "TOTALRECALL_DATABASE_URL": pg_url, "TOTALRECALL_BROKER_URL": services.redis_url,
        "TOTALRECALL_STORAGE_URL": f"s3://{bucket}/store", "TOTALRECALL_HOME": str(tmp / "home"),
        "TOTALRECALL_CHUNK_SIZE": "4", "TOTALRECALL_S3_MAX_ATTEMPTS": "2",
        "AWS_ENDPOINT_URL": services.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    })
    log = tmp / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "totalrecall.cli", "worker", "--concurrency", "2"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: " ready." in log.read_text() or worker.poll() is not None, 120)
        assert worker.poll() is None, log.read_text()
        yield System(env, pg_url, bucket, s3, broker, log, worker.pid, {})
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        broker.flushdb()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", ()):
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {seconds}s")
        time.sleep(0.2)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _count(system: System, model, *where) -> int:
    with session_scope(system.pg_url) as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


def _rows(system: System) -> list[tuple]:
    with session_scope(system.pg_url) as session:
        return session.execute(sa.select(Result.image_uri, Result.model_version_id, Result.status,
                                         Result.created_at).order_by(Result.image_uri)).all()


def _score_chunks_received(system: System) -> int:
    return sum("workers.tasks.score_chunk[" in line and line.rstrip().endswith("received")
               for line in system.worker_log.read_text().splitlines())


def test_fit_all_publishes_two_active_models(system: System) -> None:
    _ok(system.cli("db", "upgrade"))
    for name, seed in PRODUCTS.items():
        for i in range(TRAIN):
            system.put(f"train/{name}/n{i:02d}.png", png_bytes(nominal_image(seed + i, SIZE)))
        _ok(system.cli("product", "add", name, "--train", f"s3://{system.bucket}/train/{name}/",
                       "--archive", f"s3://{system.bucket}/archive/{{date}}/{name}/",
                       "--image-size", str(SIZE), "--holdout-fraction", "0.2"))
    out = _ok(system.cli("fit", "--all", "--wait"))
    assert out.count("succeeded") == 2
    with session_scope(system.pg_url) as session:
        versions = session.execute(sa.select(Product.name, ModelVersion).join(ModelVersion.product)).all()
        assert sorted(name for name, _ in versions) == sorted(PRODUCTS)
        for name, version in versions:
            assert (version.version, version.status, version.is_active) == (1, "ready", True)
            assert version.artifact_uri == f"s3://{system.bucket}/store/models/{name}/1"
            meta = system.s3.get_object(Bucket=system.bucket, Key=f"store/models/{name}/1/model.json")
            assert hashlib.sha256(meta["Body"].read()).hexdigest() == version.sha256
            system.s3.head_object(Bucket=system.bucket, Key=f"store/models/{name}/1/bank.safetensors")
            assert version.validation["activation"]["passed"] and len(version.validation["holdout_scores"]) == 4


def test_nightly_scores_every_archive_image_once(system: System) -> None:
    for name, seed in PRODUCTS.items():
        for i in range(ARCHIVE):
            image = nominal_image(10_000 + seed + i, SIZE)
            if i % 4 == 1:
                image, _ = plant_defect(image, seed + i)
            uri = system.put(f"archive/{DAY}/{name}/img-{i:02d}.png", png_bytes(image))
            system.truth[uri] = i % 4 == 1
    broken = system.put(f"archive/{DAY}/gadget/broken.png", b"\x89PNG\r\n\x1a\n broken")
    # Two schedulers race for the same night: one creates the jobs, the other finds them.
    racer = subprocess.Popen([sys.executable, "-m", "totalrecall.cli", "nightly", "--date", str(DAY)],
                             env=system.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = _ok(system.cli("nightly", "--date", str(DAY), "--wait"))
    assert racer.wait(120) == 0, racer.stderr.read()
    assert f"{broken}: ImageDecodeError" in out  # the partly failed job still succeeded (exit 0)

    with session_scope(system.pg_url) as session:
        jobs = session.scalars(sa.select(Job).where(Job.run_date == DAY)).all()
        assert len(jobs) == 2 and {j.status for j in jobs} == {"succeeded"}
        assert sorted((j.total, j.done, j.failed) for j in jobs) == [(12, 12, 0), (13, 12, 1)]
        results = session.scalars(sa.select(Result).where(Result.captured_date == DAY)).all()
    assert sorted(r.image_uri for r in results) == sorted([*system.truth, broken])
    for name in PRODUCTS:
        ok = [r for r in results if f"/{name}/" in r.image_uri and r.status == "ok"]
        labels = [system.truth[r.image_uri] for r in ok]
        assert all(r.is_anomalous for r, bad in zip(ok, labels, strict=True) if bad)
        assert image_auroc(np.array([r.score for r in ok]), np.array(labels)) >= 0.95
        for r in ok:  # masks and heatmaps in S3 for what was found (TOTALRECALL_SAVE_MAPS=findings)
            if not (r.is_anomalous or r.defect_fraction):
                assert r.mask_uri is None and r.heatmap_uri is None
                continue
            for uri in (r.mask_uri, r.heatmap_uri):
                assert uri.startswith(f"s3://{system.bucket}/store/results/{name}/1/{DAY}/img-")
                system.s3.head_object(Bucket=system.bucket, Key=uri.split("/", 3)[3])
        listed = system.s3.list_objects_v2(Bucket=system.bucket, Prefix=f"store/results/{name}/1/{DAY}/")
        saved = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith("_mask.png")]
        assert len(saved) == sum(r.mask_uri is not None for r in ok) >= sum(labels)
    (failed,) = [r for r in results if r.status == "failed"]
    assert failed.image_uri == broken and failed.score is None and "ImageDecodeError" in failed.error


def test_same_nightly_again_adds_and_rescores_nothing(system: System) -> None:
    rows, jobs, chunks = _rows(system), _count(system, Job), _score_chunks_received(system)
    out = _ok(system.cli("nightly", "--date", str(DAY), "--wait"))
    assert out.count("already scheduled as job") == 2
    time.sleep(1)
    assert _rows(system) == rows and _count(system, Job) == jobs
    assert _score_chunks_received(system) == chunks


def test_history_through_the_readonly_role(system: System) -> None:
    widget = sorted(uri for uri in system.truth if "/widget/" in uri)
    good, bad = next(u for u in widget if not system.truth[u]), next(u for u in widget if system.truth[u])
    _ok(system.cli("review", "mark", "widget", good, "--good"))  # its next fit (below) learns it
    _ok(system.cli("review", "mark", "widget", bad, "--defective", "--type", "stain"))
    password = f"ro-{uuid.uuid4().hex}"
    create_readonly_login(system.pg_url, password)
    engine = sa.create_engine(readonly_url(system.pg_url, password))
    try:
        with engine.connect() as connection:
            anomalous = connection.execute(sa.text(
                "SELECT product, image_uri, score FROM anomaly_history "
                "WHERE verdict = 'anomalous' AND captured_date = :d ORDER BY score DESC"), {"d": DAY}).all()
            planted = [uri for uri, bad in system.truth.items() if bad]
            assert set(planted) <= {uri for _, uri, _ in anomalous}
            assert connection.execute(sa.text("SELECT count(*) FROM job_summary")).scalar() >= 4
            reviews = connection.execute(sa.text(
                "SELECT image_uri, review, defect_type FROM anomaly_history WHERE review IS NOT NULL")).all()
            assert sorted(reviews) == sorted([(good, "good", None), (bad, "defective", "stain")])
        with engine.connect() as connection, pytest.raises(ProgrammingError, match="permission denied"):
            connection.execute(sa.text(
                "INSERT INTO results (job_id, model_version_id, product_id, image_uri, status) "
                "VALUES (1, 1, 1, 's3://x/forged.png', 'ok')"))
        with engine.connect() as connection, pytest.raises(ProgrammingError, match="permission denied"):
            connection.execute(sa.text("SELECT * FROM results"))
    finally:
        engine.dispose()


def test_bad_requests_enqueue_nothing_and_empty_archives_succeed(system: System) -> None:
    images = f"s3://{system.bucket}/archive/{DAY}/widget/"
    jobs = _count(system, Job)
    bad = system.cli("score", "nope", "--images", images)
    assert bad.returncode == 2 and "unknown product 'nope'" in bad.stderr
    bad = system.cli("fit", "widget", "nope")
    assert bad.returncode == 2 and "unknown product 'nope'" in bad.stderr
    _ok(system.cli("product", "add", "idle", "--train", f"s3://{system.bucket}/train/idle/",
                   "--archive", f"s3://{system.bucket}/archive/{{date}}/idle/"))
    bad = system.cli("score", "idle", "--images", images)
    assert bad.returncode == 2 and "'idle' has no active model" in bad.stderr
    assert _count(system, Job) == jobs
    assert system.redis.llen("score") == 0 and system.redis.llen("fit") == 0

    out = _ok(system.cli("nightly", "--date", str(EMPTY_DAY), "--wait"))
    assert "idle: skipped, no active model" in out and out.count("no new images to score") >= 2
    with session_scope(system.pg_url) as session:
        empty = session.scalars(sa.select(Job).where(Job.run_date == EMPTY_DAY)).all()
    assert len(empty) == 2
    assert all((j.status, j.total, j.done, j.failed) == ("succeeded", 0, 0, 0) for j in empty)


def _job_status(system: System, job_id: int) -> str:
    with session_scope(system.pg_url) as session:
        return session.get(Job, job_id).status


def test_fit_survives_a_killed_worker_process(system: System) -> None:
    out = _ok(system.cli("fit", "widget"))
    job_id = int(out.split("fit job ")[1].split()[0])
    # generous: on a loaded 2-core machine the worker may still be finishing an earlier test's tasks
    _wait_for(lambda: _job_status(system, job_id) == "running", 180)
    import psutil

    for child in psutil.Process(system.worker_pid).children():  # the pool of the worker started here
        child.kill()
    _wait_for(lambda: _job_status(system, job_id) in ("succeeded", "failed"), 120)
    assert _job_status(system, job_id) == "succeeded"
    assert "WorkerLostError" in system.worker_log.read_text()  # killed mid-task, then redelivered
    with session_scope(system.pg_url) as session:
        widget = session.scalars(sa.select(Product).where(Product.name == "widget")).one()
        versions = [(v.version, v.status, v.is_active) for v in widget.model_versions]
        reviewed = widget.model_versions[-1].validation["reviewed_good_images"]
    assert versions == [(1, "ready", False), (2, "ready", True)]  # the redelivered fit reused version 2
    assert reviewed == 1  # the archive image reviewed good above, read from S3 by the worker


def test_unavailable_storage_is_retried_with_backoff(system: System) -> None:
    from common.settings import Settings
    from workers.app import app, configure
    from workers.tasks import score_chunk

    script = os.environ.get("TOTALRECALL_SERVICES_SCRIPT")
    if not script:
        pytest.skip("TOTALRECALL_SERVICES_SCRIPT not set: cannot stop and restart S3")
    key = "adhoc/retry.png"
    image = system.put(key, png_bytes(nominal_image(4242, SIZE)))
    with session_scope(system.pg_url) as session:  # scored with widget v1, which the workers have on disk
        v1 = session.scalars(sa.select(ModelVersion).join(ModelVersion.product)
                             .where(Product.name == "widget", ModelVersion.version == 1)).one()
        job = Job(kind="score", product_id=v1.product_id, model_version_id=v1.id, total=1,
                  images_uri=f"s3://{system.bucket}/adhoc", enqueued_by="test")
        session.add(job)
        session.flush()
        job_id = job.id
    subprocess.run([script, "stop-s3"], check=True, capture_output=True)
    try:
        configure(app, Settings.from_env(system.env))
        score_chunk.delay(job_id, [image])
        _wait_for(lambda: "Retry in" in system.worker_log.read_text(), 60)
    finally:
        configure(app)
        os.killpg(system.worker_pid, signal.SIGSTOP)  # frozen while S3 comes back empty and is refilled,
        try:  # so that no retry finds the bucket missing (a permanent error) in between
            subprocess.run([script, "start-s3"], check=True, capture_output=True)
            system.s3.create_bucket(Bucket=system.bucket)  # moto keeps objects in memory: restore what we need
            system.put(key, png_bytes(nominal_image(4242, SIZE)))
        finally:
            os.killpg(system.worker_pid, signal.SIGCONT)
    _wait_for(lambda: _job_status(system, job_id) in ("succeeded", "failed"), 120)
    with session_scope(system.pg_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.done, job.failed) == ("succeeded", 1, 0)
        (row,) = session.scalars(sa.select(Result).where(Result.job_id == job_id)).all()
    assert row.status == "ok"
    system.s3.head_object(Bucket=system.bucket, Key=row.mask_uri.split("/", 3)[3])
