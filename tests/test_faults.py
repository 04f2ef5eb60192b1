"""Faults injected for real while a nightly inspection runs: whole workers SIGKILLed mid-chunk and mid-fit,
Redis stopped for 30 s, S3 stopped and restarted, PostgreSQL restarted. Each time the run must finish with
every image accounted for exactly once (see README "Guarantees").

Two racing schedulers for one night are covered by test_system.py (test_nightly_scores_every_archive_...).
`TOTALRECALL_TEST_CHUNK_DELAY` makes each image take ~1 s, so "in the middle of a chunk" lasts long enough.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date

import pytest
import sqlalchemy as sa
import torch

from common.db import ModelVersion, fresh_database
from common.engine.knn import flat_search
from common.settings import Settings, SettingsError
from tests.cluster import PRODUCT, Cluster, cluster, ok, wait_for
from tests.conftest import Services
from workers.app import celery_config

DELAY = {"TOTALRECALL_TEST_CHUNK_DELAY": "1.0"}


@pytest.fixture(scope="module")
def c(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not services.script:
        pytest.skip("TOTALRECALL_SERVICES_SCRIPT not set: cannot stop and start services")
    with (fresh_database(services.pg_url) as pg_url,
          cluster(services, pg_url, tmp_path_factory.mktemp("faults"), DELAY) as running):
        running.start_workers("a", "b")
        yield running


def test_recovery_waits_longer_than_the_scheduler_retries_sending() -> None:
    """A job younger than the sending retries may still be sending its tasks: the sweep must not resend."""
    with pytest.raises(SettingsError, match="TOTALRECALL_RECOVERY_GRACE .* must exceed"):
        Settings.from_env({"TOTALRECALL_RECOVERY_GRACE": "30", "TOTALRECALL_ENQUEUE_RETRY_SECONDS": "30"})
    policy = celery_config(Settings.from_env({"TOTALRECALL_ENQUEUE_RETRY_SECONDS": "60"}))
    assert policy["broker_connection_max_retries"] is None and policy["broker_connection_retry"]
    retry = policy["task_publish_retry_policy"]
    waits = [min(retry["interval_start"] + i * retry["interval_step"], retry["interval_max"])
             for i in range(retry["max_retries"])]
    assert 60 <= sum(waits) < 66
    assert policy["broker_transport_options"]["unacked_restore_interval"] <= 10


def _ensure_two_workers(c: Cluster) -> None:
    for name in [n for n, w in c.workers.items() if not w.alive()]:
        del c.workers[name]
    missing = [n for n in ("a", "b", "c", "d") if n not in c.workers][: max(0, 2 - len(c.workers))]
    if missing:
        c.start_workers(*missing)


def _nightly(c: Cluster, day: date) -> tuple[int, dict[str, set[str]]]:
    """Schedule the night; (job id, the chunks each worker had received before)."""
    seen = {name: set(w.received()) for name, w in c.workers.items()}
    ok(c.cli("nightly", "--date", str(day)))
    (job,) = c.jobs(day)
    return job.id, seen


def _running_chunk(c: Cluster, seen: dict[str, set[str]]) -> tuple[str, str]:
    """(worker name, task id) of a new score chunk that a worker has received and not finished."""
    def find() -> tuple[str, str] | None:
        for name, worker in c.workers.items():
            text = worker.text()
            for task_id in worker.received():
                if task_id not in seen.get(name, ()) and f"score_chunk[{task_id}] succeeded" not in text:
                    return name, task_id
        return None

    wait_for(lambda: find() is not None, 60)
    return find()


@pytest.mark.integration
def test_worker_killed_mid_chunk_is_redelivered_to_another(c: Cluster) -> None:
    day = date(2026, 6, 1)
    images = c.archive(day, 12)
    job_id, seen = _nightly(c, day)
    name, task_id = _running_chunk(c, seen)
    time.sleep(1.5)  # two images into the chunk: outputs of some images written, no row yet
    victim = c.workers[name]
    assert f"score_chunk[{task_id}] succeeded" not in victim.text()
    victim.kill()
    (job,) = c.wait_finished([job_id], 120)
    rows = c.assert_exactly_once(job, images)
    assert all(r.status == "ok" for r in rows)
    c.assert_outputs_complete(rows)
    survivor = next(w for n, w in c.workers.items() if n != name)
    assert task_id in survivor.received()  # the killed worker's chunk went to the other worker
    # No orphans: every mask in storage for that night belongs to a row.
    masks = {k for k in c.object_keys(f"store/results/{PRODUCT}/1/{day}/") if k.endswith("_mask.png")}
    assert masks == {r.mask_uri.split("/", 3)[3] for r in rows}


@pytest.mark.integration
def test_worker_killed_mid_fit_leaves_no_half_published_model(c: Cluster) -> None:
    _ensure_two_workers(c)
    out = ok(c.cli("fit", PRODUCT))
    job_id = int(out.split("fit job ")[1].split()[0])
    wait_for(lambda: c.job(job_id).status == "running", 60)
    wait_for(lambda: any((c.tmp / "scratch").glob("totalrecall-*")), 60)  # its scratch folders made
    holder = next(w for w in c.workers.values() if w.received("fit_product"))
    holder.kill()  # whole worker, mid-fit (the fit reads its 10 images ~1 s each)
    (job,) = c.wait_finished([job_id], 150)
    assert job.status == "succeeded", job.error  # redelivered after the visibility timeout
    survivor = next(w for w in c.workers.values() if w is not holder)
    assert survivor.received("fit_product")
    versions = c.query(lambda s: s.scalars(sa.select(ModelVersion).order_by(ModelVersion.version)).all())
    assert [(v.version, v.status, v.is_active) for v in versions] == [(1, "ready", False), (2, "ready", True)]
    c.assert_active_artifacts_complete()
    # The killed fit left its scratch folders (spooled images, features); a worker starting on the machine
    # deletes those untouched for longer than any task may run (here 3 s).
    leftovers = sorted((c.tmp / "scratch").glob("totalrecall-*"))
    assert leftovers
    # and a model download of a worker killed while loading it (the mid-chunk test's victim may have been)
    leftovers += sorted((c.tmp / "home" / "cache").glob(".*-*"))
    time.sleep(3)
    (tidy,) = c.start_workers("t", extra={"TOTALRECALL_FIT_SOFT_TIME_LIMIT": "1", "TOTALRECALL_FIT_TIME_LIMIT": "3",
                                          "TOTALRECALL_SCORE_SOFT_TIME_LIMIT": "1",
                                          "TOTALRECALL_SCORE_TIME_LIMIT": "2"})
    try:  # this worker's 1-second limits must not reach the next tests' chunks
        assert not any(p.exists() for p in leftovers), leftovers
        assert f"event=worker_disk_tidied leftovers={len(leftovers)}" in tidy.text()
        wait_for(lambda: "event=worker_compute" in tidy.text(), 60)  # its pool process says where it computes
        compute = next(line for line in tidy.text().splitlines() if "event=worker_compute" in line)
        cuda = torch.cuda.is_available()  # the worker sees the machine this test runs on
        assert f"device={'cuda' if cuda else 'cpu'}" in compute and ("gpu=" in compute) == cuda
        assert f"exact_search={flat_search(cuda)}" in compute
    finally:
        tidy.stop()
        del c.workers["t"]


@pytest.mark.integration
def test_a_worker_named_as_deployed_answers_its_liveness_probe(c: Cluster) -> None:
    """deploy/'s workers run `totalrecall worker --name totalrecall@%h` and their probe pings
    totalrecall@$HOSTNAME (tests/test_deploy.py ties the two): run that pair for real. The probe Celery's
    default name would need (celery@$HOSTNAME) gets no answer: that one killed every pod."""
    import socket
    import subprocess
    import sys

    from tests.cluster import Worker

    log = c.tmp / "worker-probe.log"
    with open(log, "w") as out:  # a queue of its own: it takes none of the other tests' work
        proc = subprocess.Popen([sys.executable, "-m", "totalrecall.cli", "worker", "--queues", "probe-only",
                                 "--concurrency", "1", "--name", "totalrecall@%h"], env=c.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker("probe", proc, log)
    try:
        wait_for(lambda: " ready." in worker.text() or not worker.alive(), 120)
        assert worker.alive(), worker.text()
        env = c.env | {"HOSTNAME": socket.gethostname()}
        for node, answers in (("totalrecall@$HOSTNAME", True), ("celery@$HOSTNAME", False)):
            probe = subprocess.run(["sh", "-c", f"celery --app workers.app inspect ping --destination {node} "
                                    "--timeout 10"], env=env, capture_output=True, text=True, timeout=60)
            assert (probe.returncode == 0) == answers, (node, probe.stdout, probe.stderr)
    finally:
        worker.stop()


@pytest.mark.integration
def test_broker_outage_during_a_nightly_run(c: Cluster) -> None:
    _ensure_two_workers(c)
    day, late_day, given_up_day = date(2026, 6, 2), date(2026, 6, 3), date(2026, 6, 6)
    images, late_images = c.archive(day, 16), c.archive(late_day, 8)
    given_up_images = c.archive(given_up_day, 4)
    run = c.cli_async("nightly", "--date", str(day), "--wait")
    wait_for(lambda: bool(c.jobs(day)) and c.jobs(day)[0].done > 0, 60)
    c.service("stop-redis")  # Redis keeps nothing on disk here: every queued chunk is lost
    stopped = time.monotonic()
    late = c.cli_async("nightly", "--date", str(late_day), "--wait")  # sending retries meanwhile
    # A scheduler that stops retrying fails its job, saying so, and frees the night for a rerun.
    gave_up = c.cli("nightly", "--date", str(given_up_day), extra={
        "TOTALRECALL_ENQUEUE_RETRY_SECONDS": "2", "TOTALRECALL_RECOVERY_GRACE": "3"})
    assert gave_up.returncode == 1 and "could not enqueue" in gave_up.stderr, gave_up.stderr
    (failed_job,) = c.jobs(given_up_day)
    assert failed_job.status == "failed" and failed_job.error.startswith("could not enqueue")
    assert failed_job.idempotency_key is None
    time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
    c.service("start-redis")
    out, err = run.communicate(timeout=180)
    assert run.returncode == 0, out + err
    late_out, late_err = late.communicate(timeout=60)
    assert late.returncode == 0, late_out + late_err
    ok(c.cli("nightly", "--date", str(given_up_day), "--wait"))  # the rerun creates a new job
    for d, expected in ((day, images), (late_day, late_images), (given_up_day, given_up_images)):
        job = c.jobs(d)[-1]
        rows = c.assert_exactly_once(job, expected)
        assert all(r.status == "ok" for r in rows)
    logs = "".join(w.text() for w in c.workers.values())
    recovered = [line for line in logs.splitlines() if "event=work_recovered" in line and "kind=score" in line]
    assert recovered and "lost image(s) sent again" in recovered[0]  # found by the sweep, not by luck
    assert "product=" + PRODUCT in recovered[0]
    assert all(w.alive() for w in c.workers.values())


@pytest.mark.integration
def test_storage_outage_mid_chunk(c: Cluster) -> None:
    _ensure_two_workers(c)
    day = date(2026, 6, 4)
    images = c.archive(day, 8)
    gone = images[5]
    # Taken before the nightly: copying every object takes seconds, long enough for the chunks to finish
    # before the outage on a slow machine. No chunk commits before S3 stops, so none of its outputs is lost.
    saved = c.snapshot()
    job_id, seen = _nightly(c, day)
    _running_chunk(c, seen)
    time.sleep(1.0)
    c.service("stop-s3")  # moto keeps objects in memory: they are gone until restored
    time.sleep(6)
    for worker in c.workers.values():  # freeze the workers while S3 comes back and is refilled
        worker.signal_group(19)  # SIGSTOP
    try:
        c.service("start-s3")
        c.restore({k: v for k, v in saved.items() if k != gone.split("/", 3)[3]})
    finally:
        for worker in c.workers.values():
            worker.signal_group(18)  # SIGCONT
    (job,) = c.wait_finished([job_id], 150)
    rows = c.assert_exactly_once(job, images)
    by_uri = {r.image_uri: r for r in rows}
    assert by_uri[gone].status == "failed" and by_uri[gone].error.startswith("StorageNotFound: no object at")
    assert [r.status for u, r in by_uri.items() if u != gone] == ["ok"] * 7
    c.assert_outputs_complete(rows)
    assert "Retry in" in "".join(w.text() for w in c.workers.values())  # retried with backoff


@pytest.mark.integration
def test_nightly_task_retries_while_storage_is_down(c: Cluster) -> None:
    """Beat's nightly task while S3 does not answer: it used to report the product as not scheduled and
    succeed, so the night was never inspected (no job at all). It now runs again, for the same day, until
    the archive can be listed."""
    from celery import Celery

    from workers.app import NIGHTLY_TASK, SCORE_QUEUE

    _ensure_two_workers(c)
    day = date(2026, 6, 8)  # each test of the module its own night
    images = c.archive(day, 4)
    saved = c.snapshot()
    c.service("stop-s3")
    Celery(broker=c.redis_url).send_task(NIGHTLY_TASK, args=[day.isoformat()], queue=SCORE_QUEUE)
    logs = lambda: "".join(w.text() for w in c.workers.values())  # noqa: E731
    try:
        wait_for(lambda: any("event=nightly_retry" in line and f"day={day}" in line and f"products={PRODUCT}" in line
                             for line in logs().splitlines()), 90)
        assert c.jobs(day) == []  # nothing scheduled while the archive cannot be listed
    finally:
        for worker in c.workers.values():  # frozen while S3 comes back and is refilled: a retry in
            worker.signal_group(19)  # between would list an empty archive
        try:
            c.service("start-s3")
            c.restore(saved)
        finally:
            for worker in c.workers.values():
                worker.signal_group(18)
    wait_for(lambda: bool(c.jobs(day)), 120)
    (job,) = c.wait_finished([c.jobs(day)[0].id], 120)
    rows = c.assert_exactly_once(job, images)
    assert all(r.status == "ok" for r in rows)


@pytest.mark.integration
def test_database_restart_mid_run(c: Cluster) -> None:
    _ensure_two_workers(c)
    day = date(2026, 6, 5)
    images = c.archive(day, 16)
    job_id, _ = _nightly(c, day)
    wait_for(lambda: c.job(job_id).done > 0, 60)
    c.service("stop-postgres", "fast")  # terminates every session, mid-transaction or not
    time.sleep(5)
    c.service("start-postgres")
    (job,) = c.wait_finished([job_id], 150)
    rows = c.assert_exactly_once(job, images)
    assert all(r.status == "ok" for r in rows)
    c.assert_outputs_complete(rows)
    logs = "".join(w.text() for w in c.workers.values())
    assert "event=database_unreachable" in logs or "event=database_transaction_interrupted" in logs
    assert all(w.alive() for w in c.workers.values())


@pytest.mark.integration
def test_chunk_stuck_past_its_hard_time_limit_is_given_up_after_three_starts(c: Cluster) -> None:
    """A chunk that the soft limit cannot stop is killed at the hard limit and requeued under its own id,
    so it is counted like a dead worker's chunk and given up, instead of being acknowledged and sent
    again by the recovery sweep for ever."""
    c.stop_workers()
    day = date(2026, 6, 7)
    stuck = c.put(f"archive/{day}/{PRODUCT}/stuck.png", c.get(c.archive(day, 1)[0]))
    c.start_workers("h", include=("tests.stuck_scoring",),
                    extra={"TOTALRECALL_SCORE_SOFT_TIME_LIMIT": "6", "TOTALRECALL_SCORE_TIME_LIMIT": "8",
                           "TOTALRECALL_TEST_CHUNK_DELAY": "0"})
    ok(c.cli("nightly", "--date", str(day), extra={"TOTALRECALL_CHUNK_SIZE": "1"}))
    (job,) = c.jobs(day)
    (job,) = c.wait_finished([job.id], 90)
    rows = c.results(job_id=job.id)
    by_uri = {r.image_uri: r for r in rows}
    assert by_uri[stuck].status == "failed", by_uri[stuck].error
    assert "started 4 times" in by_uri[stuck].error
    assert [r.status for u, r in by_uri.items() if u != stuck] == ["ok"]
    worker = c.workers["h"]
    assert worker.text().count("Hard time limit (8") == 3
    assert len(set(worker.received())) == 2  # the stuck chunk kept its task id: one id per chunk
    c.stop_workers()
