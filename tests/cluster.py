"""A small TotalRecall cluster for fault-injection tests: real PostgreSQL, Redis and S3 (moto), real
`celery worker` processes that tests kill, and `deploy/dev-services.sh` to stop and start services.

Used by test_faults.py, test_bad_input.py and test_security.py. Images are small (96 px), coreset 0.25,
visibility timeout 15 s, S3 retries short, so a fault and its recovery take seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from common.db import Job, ModelVersion, Product, Result, session_scope
from common.synthetic import nominal_image, png_bytes

SIZE = 96
PRODUCT = "widget"
TRAIN = 10
BASE_ENV = {
    # every scored image writes its mask and heatmap, so the fault tests check outputs and rows of all
    # of them (the default, "findings", is tested in test_system and test_workers)
    "TOTALRECALL_SAVE_MAPS": "all",
    "TOTALRECALL_CHUNK_SIZE": "4",
    "TOTALRECALL_S3_MAX_ATTEMPTS": "2",
    "TOTALRECALL_S3_TIMEOUT": "5",
    "TOTALRECALL_VISIBILITY_TIMEOUT": "15",
    "TOTALRECALL_RECOVERY_INTERVAL": "3",
    "TOTALRECALL_ENQUEUE_RETRY_SECONDS": "35",
    "TOTALRECALL_RECOVERY_GRACE": "36",
    "TOTALRECALL_DB_RETRY_SECONDS": "60",
}


@dataclass
class Worker:
    """One `celery worker` process (its own session: killing its group kills its pool too)."""

    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pool_pids(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def received(self, task: str = "score_chunk") -> list[str]:
        """Ids of the tasks of that name this worker received, in order."""
        marker = f"workers.tasks.{task}["
        return [line.split(marker, 1)[1].split("]", 1)[0] for line in self.text().splitlines()
                if marker in line and line.rstrip().endswith("received")]

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), SIGKILL if it takes too long."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


@dataclass
class Cluster:
    env: dict[str, str]
    pg_url: str
    redis_url: str
    bucket: str
    s3: Any  # boto3 client
    redis: Any  # redis.Redis
    tmp: Path
    script: str | None
    workers: dict[str, Worker] = field(default_factory=dict)

    # --- operator actions ----------------------------------------------------------------------------
    def cli(self, *args: str, extra: dict[str, str] | None = None, timeout: float = 240
            ) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "totalrecall.cli", *args], env=self.env | (extra or {}),
                              capture_output=True, text=True, timeout=timeout)

    def cli_async(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "totalrecall.cli", *args],
                                env=self.env | (extra or {}), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def service(self, *action: str) -> None:
        """Run dev-services.sh (stop-redis, start-s3, stop-postgres fast ...)."""
        assert self.script, "TOTALRECALL_SERVICES_SCRIPT not set"
        subprocess.run([self.script, *action], check=True, capture_output=True, timeout=120)

    # --- storage ---------------------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def get(self, uri: str) -> bytes:
        bucket, key = uri[len("s3://"):].split("/", 1)
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def object_keys(self, prefix: str = "") -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", ()))
        return out

    def snapshot(self) -> dict[str, bytes]:
        return {k: self.s3.get_object(Bucket=self.bucket, Key=k)["Body"].read() for k in self.object_keys()}

    def restore(self, objects: dict[str, bytes]) -> None:
        with contextlib.suppress(self.s3.exceptions.BucketAlreadyOwnedByYou):
            self.s3.create_bucket(Bucket=self.bucket)
        for key, data in objects.items():
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def archive(self, day: date, n: int, seed: int = 0, product: str = PRODUCT) -> list[str]:
        """n nominal archive images for `day`; their URIs."""
        return [self.put(f"archive/{day}/{product}/img-{i:03d}.png",
                         png_bytes(nominal_image(day.toordinal() * 100 + seed + i, SIZE)))
                for i in range(n)]

    # --- workers ---------------------------------------------------------------------------------------
    def start_workers(self, *names: str, extra: dict[str, str] | None = None, concurrency: int = 1,
                      timeout: float = 120, include: tuple[str, ...] = ()) -> list[Worker]:
        """Start workers (in parallel) and wait until each is ready; `include`: more modules they import."""
        started = []
        for name in names:
            log = self.tmp / f"worker-{name}-{uuid.uuid4().hex[:6]}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "workers.app:app", "worker", "-n", f"{name}@%h",
                     "-Q", "fit,score", "-P", "prefork", "-c", str(concurrency), "--loglevel", "INFO",
                     "--without-gossip", "--without-mingle", *(f"--include={m}" for m in include)],
                    env=self.env | (extra or {}), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.workers[name] = worker = Worker(name, proc, log)
            started.append(worker)
        for worker in started:
            wait_for(lambda w=worker: " ready." in w.text() or not w.alive(), timeout)
            assert worker.alive(), worker.text()
        return started

    def stop_workers(self) -> None:
        for worker in self.workers.values():  # all at once, then wait
            if worker.alive():
                worker.signal_group(signal.SIGTERM)
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()

    # --- database --------------------------------------------------------------------------------------
    def query(self, fn: Callable[[Any], Any], seconds: float = 90) -> Any:
        """fn(session), retried while the database is restarting."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                with session_scope(self.pg_url) as session:
                    return fn(session)
            except OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def jobs(self, day: date) -> list[Job]:
        return self.query(lambda s: s.scalars(sa.select(Job).where(Job.run_date == day).order_by(Job.id)).all())

    def job(self, job_id: int) -> Job:
        return self.query(lambda s: s.get(Job, job_id))

    def results(self, **where: Any) -> list[Result]:
        return self.query(lambda s: s.scalars(sa.select(Result).filter_by(**where)
                                              .order_by(Result.image_uri)).all())

    def wait_finished(self, job_ids: list[int], timeout: float) -> list[Job]:
        wait_for(lambda: all(self.job(j).status in ("succeeded", "failed") for j in job_ids), timeout)
        return [self.job(j) for j in job_ids]

    def active_versions(self) -> list[tuple[str, ModelVersion]]:
        return self.query(lambda s: s.execute(sa.select(Product.name, ModelVersion)
                                              .join(ModelVersion.product)
                                              .where(ModelVersion.is_active)).all())

    # --- invariants ------------------------------------------------------------------------------------
    def assert_exactly_once(self, job: Job, images: list[str]) -> list[Result]:
        """One result row per image, all of this job, job counts add up; returns the rows."""
        rows = self.results(job_id=job.id)
        state = f"job {job.id}: {job.status} {job.done}/{job.failed}/{job.total} {job.error or ''}; " + \
            "; ".join(f"{r.image_uri.rsplit('/', 1)[1]}: {r.status} {r.error or ''}" for r in rows)
        assert sorted(r.image_uri for r in rows) == sorted(images), state
        assert job.status == "succeeded" and job.total == len(images) == job.done + job.failed, state
        assert job.done == sum(r.status == "ok" for r in rows), state
        return rows

    def assert_outputs_complete(self, rows: list[Result]) -> None:
        """Every ok row has its mask and heatmap (TOTALRECALL_SAVE_MAPS=all), each a PNG of the image's size."""
        from io import BytesIO

        from PIL import Image

        for row in rows:
            if row.status != "ok":
                assert row.mask_uri is None and row.heatmap_uri is None
                continue
            for uri in (row.mask_uri, row.heatmap_uri):
                with Image.open(BytesIO(self.get(uri))) as png:
                    assert png.format == "PNG" and png.size == (SIZE, SIZE), uri
                    png.load()

    def assert_active_artifacts_complete(self) -> None:
        """Every active model version's artifact exists and matches its recorded sha256 (and the bank
        the sha256 of model.json names)."""
        for _, version in self.active_versions():
            prefix = version.artifact_uri[len(f"s3://{self.bucket}/"):]
            meta = self.s3.get_object(Bucket=self.bucket, Key=f"{prefix}/model.json")["Body"].read()
            assert hashlib.sha256(meta).hexdigest() == version.sha256
            bank = self.s3.get_object(Bucket=self.bucket, Key=f"{prefix}/bank.safetensors")["Body"].read()
            assert hashlib.sha256(bank).hexdigest() == json.loads(meta)["bank_sha256"]


def wait_for(condition: Callable[[], bool], seconds: float, poll: float = 0.2) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {seconds} s")
        time.sleep(poll)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Run this process with exactly `env`'s TOTALRECALL_* and AWS_* variables (settings, Celery and the
    model cache follow), then put everything back."""
    from common.settings import reset_settings_cache
    from workers.app import app, configure
    from workers.model_cache import reset_model_cache

    saved = {k: v for k, v in os.environ.items() if k.startswith(("TOTALRECALL_", "AWS_"))}

    def apply(values: dict[str, str]) -> None:
        for key in [k for k in os.environ if k.startswith(("TOTALRECALL_", "AWS_"))]:
            del os.environ[key]
        os.environ.update({k: v for k, v in values.items() if k.startswith(("TOTALRECALL_", "AWS_"))})
        reset_settings_cache()
        configure(app)
        reset_model_cache()

    apply(env)
    try:
        yield
    finally:
        apply(saved)


@contextlib.contextmanager
def cluster(services: Any, pg_url: str, tmp: Path, extra: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A fresh bucket, a flushed Redis database, the schema, and product `widget` fitted (model v1)."""
    import boto3
    import redis

    s3 = boto3.client("s3", endpoint_url=services.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    bucket = f"tr-faults-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    broker = redis.Redis.from_url(services.redis_url)
    broker.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOTALRECALL_", "AWS_"))}
    env |= BASE_ENV | {
        "TOTALRECALL_DATABASE_URL": pg_url, "TOTALRECALL_BROKER_URL": services.redis_url,
        "TOTALRECALL_STORAGE_URL": f"s3://{bucket}/store", "TOTALRECALL_HOME": str(tmp / "home"),
        "TMPDIR": str(tmp / "scratch"),  # the workers' scratch folders, which tests inspect
        "AWS_ENDPOINT_URL": services.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    } | (extra or {})
    (tmp / "scratch").mkdir()
    c = Cluster(env, pg_url, services.redis_url, bucket, s3, broker, tmp, services.script)
    try:
        for i in range(TRAIN):
            c.put(f"train/{PRODUCT}/n{i:02d}.png", png_bytes(nominal_image(i, SIZE)))
        # Schema, product and model v1 in this process, tasks in-process (no worker needed yet).
        with environment(env | {"TOTALRECALL_BROKER_URL": "", "TOTALRECALL_TEST_CHUNK_DELAY": ""}):
            from common.engine.config import PatchCoreConfig
            from common.migrate import upgrade
            from scheduler.adhoc import enqueue_fits
            from scheduler.products import add_product

            upgrade()
            add_product(PRODUCT, f"s3://{bucket}/train/{PRODUCT}/", f"s3://{bucket}/archive/{{date}}/{PRODUCT}/",
                        PatchCoreConfig(image_size=SIZE, coreset_ratio=0.25, holdout_fraction=0.2))
            enqueue_fits([PRODUCT])
        yield c
    finally:
        c.stop_workers()
        with contextlib.suppress(Exception):
            broker.flushdb()
        with contextlib.suppress(Exception):
            for key in c.object_keys():
                s3.delete_object(Bucket=bucket, Key=key)
            s3.delete_bucket(Bucket=bucket)
