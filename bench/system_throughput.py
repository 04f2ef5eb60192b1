"""End-to-end throughput of the distributed system (issue 3): nightly inspection over real services and
real worker processes, against the engine alone on the same images.

    # services on your own ports/state dir (the script reads their URLs from `dev-services.sh env`):
    export TOTALRECALL_SERVICES_DIR=/tmp/tr-bench-services TOTALRECALL_PG_PORT=54439 \\
           TOTALRECALL_REDIS_PORT=63809 TOTALRECALL_S3_PORT=50019
    deploy/dev-services.sh start
    python bench/system_throughput.py                       # N=1000 archive images, 256 px
    python bench/system_throughput.py --images 300 --image-size 256
    deploy/dev-services.sh stop

Services: by default the script EXPECTS PostgreSQL, Redis and moto to be running (it only runs
`deploy/dev-services.sh env`, which honours TOTALRECALL_SERVICES_DIR / TOTALRECALL_*_PORT, to get their
URLs). With `--manage-services` it runs `dev-services.sh start` first and `dev-services.sh stop` at the end
(with the same environment, so only the services of that state dir and those ports).

What it does, all on fresh state (a new PostgreSQL database, a new moto bucket, a flushed Redis db number):
  1. generates `--train` nominal training images and N archive images (PNG, `--image-size` px,
     `--defect-every`-th image with a planted defect) under archive/<date>/<product>/ in the bucket;
  2. `totalrecall db upgrade`, `totalrecall product add`, `totalrecall fit --wait` in-process (not timed);
  3. engine alone: downloads the artifact and the N PNGs from S3 beforehand, `PatchCore.load`, then times
     `predict` over the PNG bytes in this one process (same batch size as the product's fit config,
     torch threads = CPU count, so it uses the same cores as the workers together); it is timed again
     after step 5 on the same bytes, and `engine_ips` is the mean rate of the two runs (the speed of a
     shared machine drifts between phases; `engine_ips_before` / `engine_ips_after` are both kept);
  4. starts `--workers` real `totalrecall worker --queues fit,score --concurrency C` processes (default:
     2 processes x concurrency 1, each with OMP/MKL/NUMBA threads = cores / workers, so two processes share
     the cores fairly; separate model caches, as on separate machines) and waits until they are ready;
  5. times `totalrecall nightly --date D --wait` end to end (subprocess start to exit, model loads in the
     workers included), polling the results table for the first row;
  6. prints ONE JSON line on stdout with every figure (progress goes to stderr).

Database figures: `pg_rows_per_s_wall` = rows / wall; `pg_rows_per_s_commit_span` = rows over the spread
of the rows' created_at (first to last chunk commit: bounded by scoring, not by the database);
`pg_active_s` = delta of pg_stat_database.active_time for the benchmark database (time the server spent
executing statements of every session: the workers' writes and reads, the scheduler, --wait and this
script's poller), so `pg_rows_per_active_s` is a lower bound on what the database can absorb.

CPU figures: `cpu_s_during_nightly` = CPU seconds each process group (moto, PostgreSQL with its backends,
Redis, the workers with their pool processes) used during the timed nightly, against `cpu_s_available`
(wall x cores) and the engine's own `engine_cpu_s`: on one machine the services take their share of the
same cores, which a plant's separate S3 and database machines would not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRODUCT = "bench"
SERVICES = REPO / "deploy" / "dev-services.sh"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def services_env() -> dict[str, str]:
    out = subprocess.run([str(SERVICES), "env"], check=True, capture_output=True, text=True).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            env[key] = shlex.split(value)[0]
    return env


def service_pids() -> dict[str, int]:
    """Main pid of each dev service (from dev-services.sh's state folder); missing ones are left out."""
    state = Path(os.environ.get("TOTALRECALL_SERVICES_DIR", "/tmp/totalrecall-services"))
    files = {"moto_s3": state / "moto" / "moto.pid", "redis": state / "redis" / "redis.pid",
             "postgres": state / "postgres" / "data" / "postmaster.pid"}
    pids = {}
    for name, path in files.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids[name] = int(path.read_text().split()[0])
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process, its reaped children and its live descendants."""
    import psutil

    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total
    except psutil.Error:
        return 0.0


def cpu_by_process(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}


def make_images(n: int, size: int, defect_every: int, offset: int) -> list[tuple[bytes, bool]]:
    from common.synthetic import nominal_image, plant_defect, png_bytes

    def one(i: int) -> tuple[bytes, bool]:
        image = nominal_image(offset + i, size)
        bad = defect_every > 0 and i % defect_every == defect_every // 2
        if bad:
            image, _ = plant_defect(image, offset + i)
        return png_bytes(image), bad

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def pg_db_stats(url: str, dbname: str) -> dict[str, float]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            row = c.execute(sa.text("SELECT xact_commit, tup_inserted, tup_updated, active_time "
                                    "FROM pg_stat_database WHERE datname = :d"), {"d": dbname}).one()
        return {"xact_commit": row[0], "tup_inserted": row[1], "tup_updated": row[2],
                "active_ms": float(row[3] or 0.0)}
    finally:
        engine.dispose()


def timed_predict(model, blobs: list[bytes]) -> tuple[float, float, list]:
    """(wall s, CPU s of this process, results) of the engine scoring `blobs` in this one process."""
    t, c = time.monotonic(), time.process_time()
    results = model.predict(blobs)
    return time.monotonic() - t, time.process_time() - c, results


def wait_for(cond, seconds: float, poll: float = 0.2) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {seconds} s")
        time.sleep(poll)


def main() -> int:
    from common.engine.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="archive images to score (N)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--train", type=int, default=60, help="nominal training images")
    p.add_argument("--defect-every", type=int, default=10, help="every k-th archive image has a defect")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=int, default=1, help="--concurrency of each worker")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL/NUMBA threads per worker pool process (default: cores / total pool size)")
    p.add_argument("--chunk-size", type=int, default=None, help="TOTALRECALL_CHUNK_SIZE (default: system's)")
    p.add_argument("--batch-size", type=int, default=None, help="engine batch size (default: fit config's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the product's backbone arithmetic (default: the fit config's default)")
    p.add_argument("--save-maps", choices=["findings", "all", "none"], default=None,
                   help="TOTALRECALL_SAVE_MAPS of the workers (default: the system's, findings)")
    p.add_argument("--date", default="2026-11-27")
    p.add_argument("--redis-db", type=int, default=7)
    p.add_argument("--manage-services", action="store_true",
                   help="run dev-services.sh start before and stop after (same env: same ports/state dir)")
    p.add_argument("--skip-engine", action="store_true", help="no engine-alone baseline")
    p.add_argument("--keep", action="store_true", help="keep the bucket (the database is always dropped)")
    a = p.parse_args()

    load_before = os.getloadavg()
    t_script = time.monotonic()
    if a.manage_services:
        subprocess.run([str(SERVICES), "start"], check=True)
    try:
        return run(a, load_before, t_script)
    finally:
        if a.manage_services:
            subprocess.run([str(SERVICES), "stop"], check=False)


def run(a: argparse.Namespace, load_before: tuple[float, ...], t_script: float) -> int:
    import boto3
    import redis
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from common.db import fresh_database

    svc = services_env()
    day = date.fromisoformat(a.date)
    cores = os.cpu_count() or 1
    pool_size = a.workers * a.concurrency
    threads = a.threads or max(1, cores // pool_size)
    s3 = boto3.client("s3", endpoint_url=svc["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    bucket = f"tr-bench-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    redis_url = svc["TOTALRECALL_BROKER_URL"].rsplit("/", 1)[0] + f"/{a.redis_db}"
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="tr-bench-"))
    workers: list[subprocess.Popen] = []
    figures: dict = {}
    try:
        with fresh_database(svc["TOTALRECALL_DATABASE_URL"], "tr_bench") as pg_url:
            dbname = make_url(pg_url).database
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TOTALRECALL_", "AWS_"))}
            env |= {
                "TOTALRECALL_DATABASE_URL": pg_url, "TOTALRECALL_BROKER_URL": redis_url,
                "TOTALRECALL_STORAGE_URL": f"s3://{bucket}/store", "TOTALRECALL_HOME": str(tmp / "home"),
                "AWS_ENDPOINT_URL": svc["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "PYTHONPATH": str(REPO),
            }
            if a.chunk_size:
                env["TOTALRECALL_CHUNK_SIZE"] = str(a.chunk_size)
            if a.save_maps:
                env["TOTALRECALL_SAVE_MAPS"] = a.save_maps

            def cli(*args: str, extra: dict | None = None, timeout: float = 3600) -> str:
                r = subprocess.run([sys.executable, "-m", "totalrecall.cli", *args], env=env | (extra or {}),
                                   capture_output=True, text=True, timeout=timeout)
                if r.returncode != 0:
                    raise RuntimeError(f"totalrecall {' '.join(args)}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
                return r.stdout

            # 1. images
            t = time.monotonic()
            train = make_images(a.train, a.image_size, 0, 0)
            archive = make_images(a.images, a.image_size, a.defect_every, 100_000)
            gen_s = time.monotonic() - t
            keys = [f"train/{PRODUCT}/n{i:03d}.png" for i in range(a.train)]
            akeys = [f"archive/{day}/{PRODUCT}/img-{i:05d}.png" for i in range(a.images)]
            t = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]),
                              [*zip(keys, (b for b, _ in train), strict=True), *zip(akeys, (b for b, _ in archive), strict=True)]))
            upload_s = time.monotonic() - t
            truth = {f"s3://{bucket}/{k}": bad for k, (_, bad) in zip(akeys, archive, strict=True)}
            png_mb = sum(len(b) for b, _ in archive) / 2**20
            log(f"generated {a.train}+{a.images} images in {gen_s:.1f}s ({png_mb:.1f} MiB archive), "
                f"uploaded in {upload_s:.1f}s")
            del train, archive

            # 2. schema, product, fit (in-process, not timed as throughput)
            cli("db", "upgrade")
            add = ["product", "add", PRODUCT, "--train", f"s3://{bucket}/train/{PRODUCT}/",
                   "--archive", f"s3://{bucket}/archive/{{date}}/{PRODUCT}/", "--image-size", str(a.image_size)]
            if a.batch_size:
                add += ["--batch-size", str(a.batch_size)]
            if a.precision:
                add += ["--precision", a.precision]
            cli(*add)
            t = time.monotonic()
            cli("fit", PRODUCT, "--wait", extra={"TOTALRECALL_BROKER_URL": ""})
            fit_s = time.monotonic() - t
            from common.db import ModelVersion, Result, session_scope

            with session_scope(pg_url) as s:
                mv = s.scalars(sa.select(ModelVersion).where(ModelVersion.is_active)).one()
                artifact_uri, sha256, config = mv.artifact_uri, mv.sha256, dict(mv.config)
            log(f"fitted in {fit_s:.1f}s: {artifact_uri}")

            # 3. engine alone, same artifact, same PNG bytes (downloaded beforehand), one process
            engine: dict = {}
            engine_scores: dict[str, float] = {}
            if not a.skip_engine:
                import torch

                from common.engine.patchcore import PatchCore

                torch.set_num_threads(cores)
                art = tmp / "artifact"
                art.mkdir()
                prefix = artifact_uri[len(f"s3://{bucket}/"):]
                for name in ("model.json", "bank.safetensors"):
                    s3.download_file(bucket, f"{prefix}/{name}", str(art / name))
                with ThreadPoolExecutor(16) as pool:
                    blobs = list(pool.map(lambda k: s3.get_object(Bucket=bucket, Key=k)["Body"].read(), akeys))
                t = time.monotonic()
                model = PatchCore.load(art, sha256, device="cpu")
                load_s = time.monotonic() - t
                engine_s, engine_cpu_s, results = timed_predict(model, blobs)
                assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
                engine_scores = {f"s3://{bucket}/{k}": r.score for k, r in zip(akeys, results, strict=True)}
                engine = {"engine_s": round(engine_s, 2), "engine_ips": round(a.images / engine_s, 2),
                          "engine_cpu_s": round(engine_cpu_s, 2),
                          "engine_load_s": round(load_s, 2), "engine_torch_threads": torch.get_num_threads(),
                          "engine_batch_size": model.config.batch_size}
                log(f"engine alone: {a.images} images in {engine_s:.1f}s = {a.images / engine_s:.1f} img/s")
                del results

            # 4. workers
            wenv = env | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                          "NUMBA_NUM_THREADS": str(threads)}
            logs = []
            for w in range(a.workers):
                wlog = tmp / f"worker-{w}.log"
                logs.append(wlog)
                with open(wlog, "w") as out:
                    workers.append(subprocess.Popen(
                        [sys.executable, "-m", "totalrecall.cli", "worker", "--queues", "fit,score",
                         "--concurrency", str(a.concurrency)],
                        env=wenv | {"TOTALRECALL_CACHE_DIR": str(tmp / f"cache-{w}")},
                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            t = time.monotonic()
            for proc, wlog in zip(workers, logs, strict=True):
                wait_for(lambda p=proc, w=wlog: " ready." in w.read_text(errors="replace") or p.poll() is not None,
                         180)
                if proc.poll() is not None:
                    raise RuntimeError(f"worker died:\n{wlog.read_text(errors='replace')}")
            log(f"{a.workers} worker(s) x concurrency {a.concurrency} ready in {time.monotonic() - t:.1f}s "
                f"({threads} thread(s) each)")

            # 5. the timed nightly
            stats0 = pg_db_stats(pg_url, dbname)
            first_row: list[float] = []
            stop = threading.Event()

            def poll(t0: float) -> None:
                from sqlalchemy.pool import NullPool

                eng = sa.create_engine(pg_url, poolclass=NullPool)
                with eng.connect() as c:
                    while not stop.is_set():
                        if c.execute(sa.text("SELECT EXISTS (SELECT 1 FROM results)")).scalar():
                            first_row.append(time.monotonic() - t0)
                            break
                        c.commit()
                        time.sleep(0.05)
                eng.dispose()

            groups = {name: [pid] for name, pid in service_pids().items()}
            groups["workers"] = [proc.pid for proc in workers]
            cpu0 = cpu_by_process(groups)
            wall_start = datetime.now(UTC)
            t0 = time.monotonic()
            poller = threading.Thread(target=poll, args=(t0,), daemon=True)
            poller.start()
            r = subprocess.run([sys.executable, "-m", "totalrecall.cli", "nightly", "--date", str(day), "--wait"],
                               env=env, capture_output=True, text=True, timeout=7200)
            wall = time.monotonic() - t0
            cpu_s = {name: round(v - cpu0[name], 2) for name, v in cpu_by_process(groups).items()}
            stop.set()
            poller.join(5)
            if r.returncode != 0:
                raise RuntimeError(f"nightly rc={r.returncode}\n{r.stdout}\n{r.stderr}")
            log(f"nightly --wait: {wall:.1f}s\n{r.stdout.strip()}")

            # stop the workers (their sessions end, so their statistics reach pg_stat_database)
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            time.sleep(1.0)
            stats1 = pg_db_stats(pg_url, dbname)
            if engine:  # the engine again, after the system: the machine's speed drifts between the phases
                after_s, after_cpu_s, _ = timed_predict(model, blobs)
                log(f"engine alone again: {a.images / after_s:.1f} img/s")
                engine |= {"engine_ips_before": engine["engine_ips"],
                           "engine_ips_after": round(a.images / after_s, 2),
                           "engine_cpu_s_after": round(after_cpu_s, 2),
                           "engine_ips": round(2 * a.images / (engine_s + after_s), 2)}
                del blobs, model
            chunks = sum(line.rstrip().endswith("received") and "score_chunk[" in line
                         for wlog in logs for line in wlog.read_text(errors="replace").splitlines())
            per_worker = [sum(line.rstrip().endswith("received") and "score_chunk[" in line
                              for line in wlog.read_text(errors="replace").splitlines()) for wlog in logs]

            with session_scope(pg_url) as s:
                rows = s.execute(sa.select(Result.image_uri, Result.status, Result.score, Result.created_at,
                                           Result.mask_uri)).all()
            ok = [r for r in rows if r.status == "ok"]
            created = sorted(r.created_at for r in rows)
            span = (created[-1] - created[0]).total_seconds() if created else 0.0
            first_commit = (created[0] - wall_start).total_seconds() if created else None
            import numpy as np

            from common.engine.metrics import image_auroc

            auroc = image_auroc(np.array([r.score for r in ok]), np.array([truth[r.image_uri] for r in ok]))
            max_diff = (max(abs(r.score - engine_scores[r.image_uri]) for r in ok) if engine_scores else None)
            active_s = (stats1["active_ms"] - stats0["active_ms"]) / 1000.0
            system_ips = a.images / wall
            figures = {
                "bench": "system_throughput", "images": a.images, "image_size": a.image_size,
                "train_images": a.train, "workers": a.workers, "concurrency": a.concurrency,
                "threads_per_pool_process": threads, "cores": cores,
                "chunk_size": int(env.get("TOTALRECALL_CHUNK_SIZE", 64)), "score_chunks": chunks,
                "chunks_per_worker": per_worker, "backbone": config.get("backbone"),
                "coreset_ratio": config.get("coreset_ratio"), "batch_size": config.get("batch_size"),
                "precision": config.get("precision"), "fit_s": round(fit_s, 1),
                "save_maps": env.get("TOTALRECALL_SAVE_MAPS", "findings (default)"),
                "images_with_maps": sum(r.mask_uri is not None for r in ok),
                "system_wall_s": round(wall, 2), "system_ips": round(system_ips, 2),
                "first_row_s_poll": round(first_row[0], 2) if first_row else None,
                "first_row_s_created_at": round(first_commit, 2) if first_commit is not None else None,
                "rows": len(rows), "rows_ok": len(ok), "rows_failed": len(rows) - len(ok),
                "pg_rows_per_s_wall": round(len(rows) / wall, 1),
                "pg_commit_span_s": round(span, 2),
                "pg_rows_per_s_commit_span": round(len(rows) / span, 1) if span > 0 else None,
                "pg_active_s": round(active_s, 3),
                "pg_rows_per_active_s": round(len(rows) / active_s, 1) if active_s > 0 else None,
                "pg_xact_commit": stats1["xact_commit"] - stats0["xact_commit"],
                "pg_tup_inserted": stats1["tup_inserted"] - stats0["tup_inserted"],
                "cpu_s_during_nightly": cpu_s,  # per process group, over the nightly's wall time
                "cpu_s_available": round(wall * cores, 1),
                **engine,
                "overhead": round(1 - system_ips / engine["engine_ips"], 3) if engine else None,
                "overhead_goal": "< 0.20",
                "max_abs_score_diff_vs_engine": max_diff, "auroc": round(float(auroc), 4),
                "png_archive_mib": round(png_mb, 1),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "script_wall_s": round(time.monotonic() - t_script, 1),
            }
    finally:
        for proc in workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(Exception):
            broker.flushdb()
        if not a.keep:
            with contextlib.suppress(Exception):
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    objs = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                    if objs:
                        s3.delete_objects(Bucket=bucket, Delete={"Objects": objs})
                s3.delete_bucket(Bucket=bucket)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
