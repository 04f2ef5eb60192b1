"""The recovery sweep (`scheduler.recovery`) against a real Redis broker and a real S3 endpoint, without
workers: what it sends again is read back from the broker's queue."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from common.db import UNFINISHED, Job, ModelStatus, ModelVersion, Result, session_scope, utcnow
from common.engine.config import PatchCoreConfig
from scheduler.jobs import new_score_job, send_chunks
from scheduler.products import add_product
from scheduler.recovery import UNLISTABLE_GIVE_UP, recover_lost_work
from tests.conftest import embedded_default
from workers.broker import pending_work

pytestmark = pytest.mark.integration


@pytest.fixture
def broker_url(redis_url: str) -> Iterator[str]:
    """The test Redis server's database 14, which no other test uses, emptied before and after."""
    server = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    url = f"{server}/14"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def _old_score_job(product_id: int, version_id: int, images_uri: str, total: int, hours: float = 1) -> int:
    with session_scope() as session:
        job = new_score_job(product_id, version_id, images_uri, total, enqueued_by="test")
        session.add(job)
        session.flush()
        job.created_at = utcnow() - timedelta(hours=hours)  # past the recovery grace
        return job.id


def _product_with_a_folder(tmp_path: Path) -> tuple[int, int, Path]:
    """(product id, active version id, a folder of 3 images) in the current embedded database."""
    folder = tmp_path / "archive"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(b"not decoded by the sweep")
    product_id = add_product("part", str(tmp_path / "train"), str(tmp_path / "a/{date}"), PatchCoreConfig())
    with session_scope() as session:
        version = ModelVersion(product_id=product_id, version=1, artifact_uri="file:///none", sha256="0" * 64,
                               status=ModelStatus.READY.value, is_active=True, image_threshold=1.0,
                               pixel_threshold=1.0)
        session.add(version)
        session.flush()
        return product_id, version.id, folder


def test_a_job_whose_folder_cannot_be_listed_does_not_hold_up_the_others(
        tmp_path: Path, broker_url: str, s3_env: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two unfinished jobs whose tasks the broker lost: the first one's bucket no longer exists. The sweep
    logs that job and still sends the second one's images again (it used to stop at the first, every
    minute, so no later job was ever recovered)."""
    broker = redis.Redis.from_url(broker_url)
    with embedded_default(tmp_path / "home", TOTALRECALL_BROKER_URL=broker_url):
        product_id, version_id, folder = _product_with_a_folder(tmp_path)
        gone = f"s3://tr-deleted-{uuid.uuid4().hex[:12]}/night/"
        lost_elsewhere = _old_score_job(product_id, version_id, gone, 3)
        recoverable = _old_score_job(product_id, version_id, str(folder), 3)

        with caplog.at_level(logging.WARNING, logger="scheduler.recovery"):
            recovered = recover_lost_work(broker)

        assert [(r.job_id, r.sent) for r in recovered] == [(recoverable, 3)]
        assert pending_work(broker).images[recoverable] == {str(folder / f"p{i}.png") for i in range(3)}
        failed = [r.getMessage() for r in caplog.records if "event=recovery_job_failed" in r.getMessage()]
        assert len(failed) == 1 and f"job={lost_elsewhere}" in failed[0] and gone.split("/")[2] in failed[0]


def test_a_job_whose_folder_stays_unlistable_is_failed_after_hours_of_nothing(
        tmp_path: Path, broker_url: str, s3_env: str) -> None:
    """Nothing else would ever finish it: after UNLISTABLE_GIVE_UP with nothing recorded it fails, saying
    why; a job that recorded a result within that time, or is younger, is only retried."""
    broker = redis.Redis.from_url(broker_url)
    with embedded_default(tmp_path / "home", TOTALRECALL_BROKER_URL=broker_url):
        product_id, version_id, _ = _product_with_a_folder(tmp_path)
        gone = f"s3://tr-deleted-{uuid.uuid4().hex[:12]}/night/"
        hours = UNLISTABLE_GIVE_UP.total_seconds() / 3600
        quiet, busy, young, queued = (_old_score_job(product_id, version_id, gone, 3, hours=h)
                                      for h in (hours + 1, hours + 1, hours - 1, hours + 1))
        send_chunks(queued, [gone + "q.png"])  # a chunk of it still waits in the broker: not given up
        with session_scope() as session:  # a chunk of `busy` recorded an image an hour ago
            session.add(Result(job_id=busy, model_version_id=version_id, product_id=product_id,
                               image_uri=gone + "a.png", status="ok", score=0.5, threshold=1.0,
                               is_anomalous=False, created_at=utcnow() - timedelta(hours=1)))

        assert recover_lost_work(broker) == []

        with session_scope() as session:
            jobs = {j.id: (j.status, j.error or "") for j in session.scalars(select(Job))}
        assert jobs[quiet][0] == "failed"
        assert gone in jobs[quiet][1] and "could not be listed" in jobs[quiet][1]
        assert jobs[busy][0] in UNFINISHED and jobs[young][0] in UNFINISHED and jobs[queued][0] in UNFINISHED
        assert pending_work(broker).images[queued] == {gone + "q.png"}


def test_a_sweep_does_not_start_while_another_still_runs(tmp_path: Path, broker_url: str) -> None:
    """The interval lock lets one worker sweep per interval; a sweep that outlasted it (a slow listing) holds
    a second lock until it ends, and the next interval's sweep, on any worker, waits for it."""
    from workers.broker import LOCK_PREFIX
    from workers.recovery import RUNNING_LOCK, sweep

    broker = redis.Redis.from_url(broker_url)
    with embedded_default(tmp_path / "home", TOTALRECALL_BROKER_URL=broker_url):
        product_id, version_id, folder = _product_with_a_folder(tmp_path)
        job = _old_score_job(product_id, version_id, str(folder), 3)
        broker.set(LOCK_PREFIX + RUNNING_LOCK, "worker-b:sweep-of-the-last-interval", ex=60)
        assert sweep("worker-a") == [] and job not in pending_work(broker).images
        broker.delete(LOCK_PREFIX + RUNNING_LOCK, LOCK_PREFIX + "recovery")  # that sweep ended; a new interval
        assert [(r.job_id, r.sent) for r in sweep("worker-a")] == [(job, 3)]
        assert broker.get(LOCK_PREFIX + RUNNING_LOCK) is None  # released when the sweep ended
