"""Chaos run: a nightly inspection through real workers that are SIGKILLed and restarted at random.

    deploy/dev-services.sh start && eval "$(deploy/dev-services.sh env)"
    python bench/chaos.py --images 600 --kills 5

Uses the test services (TOTALRECALL_TEST_PG_URL, _REDIS_URL, _S3_ENDPOINT): a fresh database, a fresh
bucket and Redis database 14 (flushed). It fits a small product, schedules one nightly job over the
images (about 1 % of them corrupt on purpose), and while the job runs kills a random worker (its whole
process group: main process and pool) every few seconds and starts it again. At the end it checks the
database: exactly one result row per image, none missing, and done + failed = total for the job. It
prints its figures as one JSON line on stdout (progress goes to stderr) and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from common.db import Job, Result, dispose_engines, execute_autocommit, session_scope
from common.synthetic import nominal_image, plant_defect, png_bytes

DAY = date(2026, 12, 24)
PRODUCT = "chaos"


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.5)


class Worker:
    """A `celery worker` in its own process group, restartable."""

    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.name, self.env, self.folder = name, env, folder
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.folder / f"worker-{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app:app", "worker", "-n",
                 f"{self.name}-{self.starts}@%h", "-Q", "fit,score", "-P", "prefork", "-c", "1",
                 "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        return " ready." in self.log_path.read_text(errors="replace")

    def busy(self) -> bool:
        """Has received a chunk it has not finished (a kill now lands mid-chunk)."""
        text = self.log_path.read_text(errors="replace")
        return text.count("score_chunk[") > 2 * text.count("] succeeded in")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "".join(self.folder.joinpath(f"worker-{self.name}-{i}.log").read_text(errors="replace")
                       for i in range(1, self.starts + 1))


def services(a: argparse.Namespace) -> tuple[str, str, str]:
    pg = a.pg_url or os.environ.get("TOTALRECALL_TEST_PG_URL")
    redis_url = a.redis_url or os.environ.get("TOTALRECALL_TEST_REDIS_URL")
    s3 = a.s3_endpoint or os.environ.get("TOTALRECALL_TEST_S3_ENDPOINT")
    if not (pg and redis_url and s3):
        sys.exit("chaos: needs PostgreSQL, Redis and S3: deploy/dev-services.sh start; "
                 "eval \"$(deploy/dev-services.sh env)\" (or --pg-url, --redis-url, --s3-endpoint)")
    redis_url = redis_url.rsplit("/", 1)[0] + "/14"  # not the tests' database
    return pg, redis_url, s3


def make_images(n: int, size: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    images = []
    for i in range(n):
        if rng.random() < 0.01:
            images.append((f"img-{i:05d}.png", b"\x89PNG\r\n\x1a\n corrupt on purpose"))
            continue
        image = nominal_image(seed * 100_000 + i, size)
        if rng.random() < 0.1:
            image, _ = plant_defect(image, i)
        images.append((f"img-{i:05d}.png", png_bytes(image)))
    return images


def run(a: argparse.Namespace) -> dict:
    import boto3
    import redis

    pg_server, redis_url, s3_endpoint = services(a)
    rng = random.Random(a.seed)
    folder = Path(tempfile.mkdtemp(prefix="totalrecall-chaos-"))
    db_name = f"tr_chaos_{uuid.uuid4().hex[:10]}"
    execute_autocommit(pg_server, f'CREATE DATABASE "{db_name}"')
    pg_url = make_url(pg_server).set(database=db_name).render_as_string(hide_password=False)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    bucket = f"tr-chaos-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    redis.Redis.from_url(redis_url).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOTALRECALL_", "AWS_"))}
    env |= {
        "TOTALRECALL_DATABASE_URL": pg_url, "TOTALRECALL_BROKER_URL": redis_url,
        "TOTALRECALL_STORAGE_URL": f"s3://{bucket}/store", "TOTALRECALL_HOME": str(folder / "home"),
        "TOTALRECALL_CHUNK_SIZE": str(a.chunk_size), "TOTALRECALL_VISIBILITY_TIMEOUT": str(a.visibility),
        "TOTALRECALL_RECOVERY_INTERVAL": "5", "TOTALRECALL_ENQUEUE_RETRY_SECONDS": "20",
        "TOTALRECALL_RECOVERY_GRACE": "30", "TOTALRECALL_S3_MAX_ATTEMPTS": "3",
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def cli(*args: str, extra: dict[str, str] | None = None) -> str:
        done = subprocess.run([sys.executable, "-m", "totalrecall.cli", *args], env=env | (extra or {}),
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"totalrecall {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    workers = [Worker(f"w{i}", env, folder) for i in range(a.workers)]
    try:
        log(f"generating {a.images} images of {a.size} px, uploading to s3://{bucket}/")
        train = make_images(12, a.size, 1)
        archive = make_images(a.images, a.size, 2)
        uploads = [(f"train/{n}", b) for n, b in train] + [(f"archive/{DAY}/{n}", b) for n, b in archive]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), uploads))
        images = {f"s3://{bucket}/archive/{DAY}/{n}" for n, _ in archive}

        log("schema, product, fit (in-process)")
        cli("db", "upgrade")
        cli("product", "add", PRODUCT, "--train", f"s3://{bucket}/train/", "--archive",
            f"s3://{bucket}/archive/{{date}}/", "--image-size", str(a.size), "--coreset-ratio", "0.25")
        cli("fit", PRODUCT, "--wait", extra={"TOTALRECALL_BROKER_URL": ""})

        for w in workers:
            w.start()
        wait_for(lambda: all(w.ready() for w in workers), 180, "workers ready")
        log(f"{a.workers} workers ready; scheduling the night")
        started = time.monotonic()
        cli("nightly", "--date", str(DAY))
        with session_scope(pg_url) as session:
            job_id = session.scalars(sa.select(Job.id).where(Job.run_date == DAY)).one()

        def job() -> Job:
            with session_scope(pg_url) as session:
                return session.get(Job, job_id)

        kills = []
        while job().status not in ("succeeded", "failed"):
            if len(kills) < a.kills and time.monotonic() - started > a.first_kill:
                time.sleep(rng.uniform(a.min_gap, a.max_gap))
                candidates = [w for w in workers if w.proc.poll() is None and w.ready() and w.busy()]
                if not candidates:
                    continue
                victim = rng.choice(candidates)
                progress = job()
                victim.kill()
                kills.append({"worker": victim.name, "at_s": round(time.monotonic() - started, 1),
                              "done": progress.done + progress.failed})
                log(f"SIGKILL {victim.name} (kill {len(kills)}) at {progress.done + progress.failed}/"
                    f"{progress.total} images")
                time.sleep(rng.uniform(0.5, 3.0))
                victim.start()
            else:
                time.sleep(1)
            if time.monotonic() - started > a.timeout:
                raise TimeoutError(f"job {job_id} not finished in {a.timeout} s")
        wall = time.monotonic() - started
        final = job()
        log(f"job {job_id} {final.status} in {wall:.1f} s: {final.done} ok, {final.failed} failed")

        with session_scope(pg_url) as session:
            rows = session.execute(sa.select(Result.image_uri, Result.status, Result.error, Result.mask_uri)
                                   .where(Result.captured_date == DAY)).all()
        uris = [r.image_uri for r in rows]
        logs = "".join(w.logs() for w in workers)
        received = [line.split("score_chunk[")[1].split("]")[0] for line in logs.splitlines()
                    if "score_chunk[" in line and line.rstrip().endswith("received")]
        masks_missing = 0
        for row in rows:
            if row.status == "ok":
                key = row.mask_uri.split("/", 3)[3]
                with contextlib.suppress(s3.exceptions.ClientError):
                    s3.head_object(Bucket=bucket, Key=key)
                    continue
                masks_missing += 1
        figures = {
            "images": len(images), "workers": a.workers, "kills": len(kills),
            "wall_s": round(wall, 1), "rows": len(rows), "duplicates": len(uris) - len(set(uris)),
            "missing": len(images - set(uris)), "unexpected": len(set(uris) - images),
            "ok": sum(r.status == "ok" for r in rows), "failed": sum(r.status == "failed" for r in rows),
            "corrupt_on_purpose": sum(b.startswith(b"\x89PNG\r\n\x1a\n corrupt") for _, b in archive),
            "given_up_after_interruptions": sum("was started" in (r.error or "") for r in rows),
            "job": {"status": final.status, "total": final.total, "done": final.done, "failed": final.failed},
            "counts_add_up": final.done + final.failed == final.total == len(images),
            "masks_missing": masks_missing,
            "chunks_received": len(received),
            "chunks_received_again": len(received) - len(set(received)),  # redelivered after a kill
            "recovery_sweeps_that_resent": logs.count("lost image(s) sent again"),
            "kill_log": kills,
        }
        figures["passed"] = (figures["duplicates"] == 0 and figures["missing"] == 0 and
                             figures["unexpected"] == 0 and figures["counts_add_up"] and
                             final.status == "succeeded" and masks_missing == 0)
        return figures
    finally:
        for w in workers:
            w.stop()
        dispose_engines(pg_url)
        if not a.keep:
            with contextlib.suppress(Exception):
                execute_autocommit(pg_server, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            with contextlib.suppress(Exception):
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    for obj in page.get("Contents", ()):
                        s3.delete_object(Bucket=bucket, Key=obj["Key"])
                s3.delete_bucket(Bucket=bucket)
        log(f"worker logs in {folder}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--size", type=int, default=128, help="image side in pixels (also the model input)")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--visibility", type=int, default=30, help="seconds before a dead worker's chunk returns")
    p.add_argument("--first-kill", type=float, default=5.0, help="seconds into the run before the first kill")
    p.add_argument("--min-gap", type=float, default=3.0)
    p.add_argument("--max-gap", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the database and the bucket")
    p.add_argument("--pg-url")
    p.add_argument("--redis-url")
    p.add_argument("--s3-endpoint")
    figures = run(p.parse_args())
    print(json.dumps(figures), flush=True)
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
