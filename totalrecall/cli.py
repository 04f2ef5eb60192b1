"""The `totalrecall` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from common.engine.config import BACKBONE_NAMES, INDEX_TYPES, PRECISIONS, RESIZE_MODES, PatchCoreConfig
from totalrecall.interrupts import keep_interrupts
from totalrecall.report import add_report_command
from totalrecall.review_cli import add_review_command

if TYPE_CHECKING:
    from scheduler.versions import VersionInfo


def add_model_options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """PatchCore settings, shared by every command that fits a model. Without `defaults` an option that is
    not given is absent from the parsed arguments (`product set` changes only the settings given)."""
    d = PatchCoreConfig()

    def arg(*names: str, **kwargs) -> None:
        if not defaults:
            kwargs["default"] = argparse.SUPPRESS
        p.add_argument(*names, **kwargs)

    arg("--backbone", default=d.backbone, help=", ".join(BACKBONE_NAMES) + " (efficientnet_lite* offline)")
    arg("--layers", default=None, help="comma-separated stages (default: stride 8 and 16)")
    arg("--weights", default=None, help="local state-dict file for the backbone")
    arg("--image-size", type=int, default=d.image_size,
        help="input side (square) or the side of the input's area (keep_aspect, scale: auto)")
    arg("--resize", choices=RESIZE_MODES, default=d.resize)
    arg("--scale", type=float, default=d.scale, help="resize factor for --resize scale")
    arg("--center-crop", type=_crop_or_none, default=None, help="paper protocol: --image-size 256 "
        "--resize square --center-crop 224 (0: none, the whole field of view)")
    arg("--embed-dim", type=int, default=d.embed_dim, help="patch feature dimension, split between the layers")
    arg("--coreset-ratio", type=float, default=d.coreset_ratio)
    arg("--coreset-min-size", type=int, default=d.coreset_min_size,
        help="the bank keeps at least this many features (or all of them)")
    arg("--projection-dim", type=int, default=d.projection_dim)
    arg("--num-neighbors", type=int, default=d.num_neighbors, help="b of Eq. 7 (0 = off)")
    arg("--image-score-top", type=float, default=d.image_score_top,
        help="the image score averages this fraction of the highest patch distances (0 = the highest alone, "
             "as in the paper)")
    arg("--holdout-fraction", type=float, default=d.holdout_fraction)
    arg("--batch-size", type=int, default=d.batch_size)
    arg("--seed", type=int, default=d.seed)
    arg("--precision", choices=PRECISIONS, default=d.precision,
        help="backbone arithmetic: auto or fp32 (float32 on every device: the same scores on GPU and CPU "
             "workers), or bf16 (bfloat16: fast on AMX CPUs, scores a few percent off float32's)")
    arg("--bit-depth", type=int, default=d.bit_depth,
        help="significant bits of images stored with more than 8 bits a sample (grey or colour), e.g. 12 "
        "for a Mono12 camera (0: the most the training images use)")
    arg("--index", choices=INDEX_TYPES, default=d.index,
        help="kNN index: flat (exact), ivf_flat or ivf_pq (approximate, for large banks)")
    arg("--index-min-bank", type=int, default=d.index_min_bank,
        help="banks smaller than this get the exact index anyway")
    arg("--index-nlist", type=int, default=d.index_nlist,
        help="IVF coarse lists (0: about 4 * sqrt(bank size))")
    arg("--index-nprobe", type=int, default=d.index_nprobe, help="IVF lists searched per query")
    arg("--index-pq-m", type=int, default=d.index_pq_m,
        help="IVF-PQ bytes per feature, a divisor of the feature dimension (0: about dim / 4)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1: not {text!r}")
    return value


def _crop_or_none(text: str) -> int | None:
    """--center-crop: a side in pixels, or 0 for none (so `product set` can take a crop away again)."""
    try:
        return int(text) or None
    except ValueError:
        raise argparse.ArgumentTypeError(f"a side in pixels, or 0 for none: not {text!r}") from None


def _given_settings(a: argparse.Namespace) -> dict:
    """The `PatchCoreConfig` fields among the parsed arguments (of `add_model_options(defaults=False)`)."""
    names = {f.name for f in fields(PatchCoreConfig)}
    given = {k: v for k, v in vars(a).items() if k in names}
    if "layers" in given:
        given["layers"] = given["layers"].split(",") if given["layers"] else None
    return given


def config_from_args(a: argparse.Namespace) -> PatchCoreConfig:
    return PatchCoreConfig(**_given_settings(a))


def cmd_evaluate(a: argparse.Namespace) -> int:
    from common.engine.evaluate import evaluate, format_table, json_safe
    from common.engine.roi import RegionOfInterest

    roi = RegionOfInterest.from_image(Path(a.roi).read_bytes()) if a.roi else None
    config = config_from_args(a)
    config.check_new()  # settings being made, as for a product
    report = evaluate(a.data, a.category, config, shots=a.shots, weights=a.weights,
                      device=a.device, progress=not a.quiet, roi=roi)
    print(format_table(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    return 0


def cmd_db_upgrade(a: argparse.Namespace) -> int:
    import psycopg2
    from sqlalchemy.exc import DBAPIError

    from common.db import READONLY_ROLE
    from common.migrate import create_readonly_login, current_revision, upgrade
    from common.settings import get_settings, redact_url

    settings = get_settings()
    upgrade()
    print(f"database {redact_url(settings.database_url)} is at revision {current_revision()}")
    if settings.readonly_password:
        try:
            create_readonly_login(settings.database_url, settings.readonly_password)
        except NotImplementedError as exc:  # SQLite: no roles
            print(f"TOTALRECALL_READONLY_PASSWORD ignored: {exc}", file=sys.stderr)
        except (DBAPIError, psycopg2.Error, LookupError) as exc:  # e.g. a migrating user without CREATEROLE
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            print(f"warning: the schema is upgraded, but role {READONLY_ROLE} was not given its login: "
                  f"{reason} (a user with CREATEROLE can run `totalrecall db upgrade` again)", file=sys.stderr)
        else:
            print(f"role {READONLY_ROLE} can log in with TOTALRECALL_READONLY_PASSWORD (it reads the history "
                  "views)")
    return 0


def cmd_product_add(a: argparse.Namespace) -> int:
    from scheduler.products import add_product

    if a.weights:
        raise ValueError("--weights is not stored with a product: workers use the backbone's packaged weights")
    if a.max_false_alarms is not None and not a.validation:
        raise ValueError("--max-false-alarms sets the image threshold from --validation images: give both")
    add_product(a.name, a.train, a.archive, config_from_args(a), a.validation, a.max_false_alarms, a.roi)
    print(f"product {a.name!r} registered; fit it with `totalrecall fit {a.name}`")
    return 0


def cmd_product_set(a: argparse.Namespace) -> int:
    from scheduler.products import UNSET, update_product

    if getattr(a, "weights", None):
        raise ValueError("--weights is not stored with a product: workers use the backbone's packaged weights")
    changes = update_product(a.name, a.train, a.archive, _given_settings(a), a.validation,
                             getattr(a, "max_false_alarms", UNSET), a.roi)
    if not changes:
        print(f"product {a.name!r}: nothing changed")
        return 0
    for what, (before, after) in changes.items():
        print(f"product {a.name!r}: {what} {before} -> {after}")
    print(f"the next fit uses them (`totalrecall fit {a.name}`); fitted model versions keep their settings")
    return 0


def _fraction_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction such as 0.01, or none: not {text!r}") from None


def cmd_model_list(a: argparse.Namespace) -> int:
    from scheduler.versions import list_versions
    from totalrecall.jobs_view import format_table

    def number(x: float | None) -> str:
        return "" if x is None else f"{x:.4g}"

    rows = []
    for v in list_versions(a.name):
        activation = v.activation or {}
        note = v.error or ("" if activation.get("passed", True) else f"not activated: {activation.get('reason')}")
        if not note and activation.get("superseded_by"):  # passed, but a newer version was active first
            note = f"not activated: v{activation['superseded_by']} (fitted later) was active first"
        labelled = v.validation_set
        thresholds = "" if v.status != "ready" else "nominal" if not labelled else (
            ("F1" if labelled.get("max_false_alarms") is None else f"<= {labelled['max_false_alarms']:.1%} FA")
            + f" ({labelled['nominal']}+{labelled['defective']})")
        images = "" if v.train_images is None else f"{v.train_images}" + (
            f"+{v.holdout_images}" if v.holdout_images is not None else "")
        rows.append([f"v{v.version}", "*" if v.is_active else "", v.status,
                     v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "", images,
                     v.bank_size, number(v.image_threshold), thresholds, number(v.nominal_median_score),
                     v.config.get("backbone"), ",".join(v.config.get("layers") or []) or "default",
                     _fit_inputs(v), note])
    print(format_table(["version", "active", "status", "created (UTC)", "images (bank+held out)", "bank",
                        "threshold", "set by", "nominal median", "backbone", "layers", "inputs", "note"], rows)
          if rows else f"product {a.name!r} has no model versions yet (`totalrecall fit {a.name}`)")
    return 0


def _fit_inputs(v: VersionInfo) -> str:
    """What besides the training folder shaped a version: its region of interest, the images reviewed good
    in its bank, and how many confirmed defects it flags."""
    parts = []
    if v.roi_fraction is not None:
        parts.append(f"roi {v.roi_fraction:.0%}")
    if v.reviewed_good_images or v.reviewed_good_failed:
        unreadable = f" ({v.reviewed_good_failed} unreadable)" if v.reviewed_good_failed else ""
        parts.append(f"{v.reviewed_good_images} reviewed good{unreadable}")
    if v.confirmed_defects:
        checked = v.confirmed_defects
        unreadable = f" ({len(checked['failed'])} unreadable)" if checked.get("failed") else ""
        parts.append(f"flags {checked['flagged']}/{checked['images']} confirmed defects{unreadable}")
    return ", ".join(parts)


def cmd_model_activate(a: argparse.Namespace) -> int:
    from scheduler.versions import activate_version

    previous, info = activate_version(a.name, a.version)
    if previous == info.version:
        print(f"model version {info.version} of {a.name!r} is already the active one")
        return 0
    print(f"model version {info.version} of {a.name!r} is now active"
          + (f" (was version {previous})" if previous is not None else "")
          + "; later score jobs use it, and results keep the version that produced them")
    activation = info.activation or {}
    if not activation.get("passed", True):
        print(f"warning: this version did not pass its activation rule at fit time: {activation.get('reason')}",
              file=sys.stderr)
    return 0


def cmd_model_deactivate(a: argparse.Namespace) -> int:
    from scheduler.versions import deactivate

    previous = deactivate(a.name)
    print(f"product {a.name!r} has no active model now" + (f" (was version {previous})" if previous else "")
          + f": nightly inspections skip it until `totalrecall model activate {a.name} VERSION` or a passing fit")
    return 0


def cmd_product_list(a: argparse.Namespace) -> int:
    from scheduler.products import list_products
    from totalrecall.jobs_view import format_table

    rows = [[p.name, p.active_version and f"v{p.active_version}", p.fit_config.get("backbone"),
             p.fit_config.get("image_size"), p.train_uri, p.archive_uri_template, p.validation_uri or "",
             p.roi_uri or ""] for p in list_products()]
    print(format_table(["product", "active model", "backbone", "size", "train", "archive", "validation", "roi"],
                       rows)
          if rows else "no products registered (see `totalrecall product add`)")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from scheduler.adhoc import enqueue_fits

    if bool(a.names) == a.all:
        raise ValueError("name the products to fit, or pass --all")
    scheduled = enqueue_fits(None if a.all else a.names)
    for s in scheduled:
        if s.message:
            print(f"fit job {s.job_id} for {s.product!r} failed: {s.message}", file=sys.stderr)
        else:
            print(f"fit job {s.job_id} for {s.product!r} enqueued")
    status = _maybe_wait(a, [s.job_id for s in scheduled if not s.message])
    return 1 if any(s.message for s in scheduled) else status


def cmd_score(a: argparse.Namespace) -> int:
    from scheduler.adhoc import score_images

    s = score_images(a.name, a.images)
    print(f"score job {s.job_id} for {s.product!r}: {s.total} image(s) enqueued, {s.skipped} already scored"
          + (f" ({s.message})" if s.message else ""))
    return _maybe_wait(a, [s.job_id])


def cmd_nightly(a: argparse.Namespace) -> int:
    from scheduler.nightly import schedule_nightly

    run = schedule_nightly(a.date, enqueued_by="cli")
    print(f"nightly inspection for {run.day.isoformat()}:")
    for s in run.jobs:
        if not s.created:
            print(f"  {s.product}: {s.message}")
        else:
            print(f"  {s.product}: job {s.job_id}, {s.total} image(s) enqueued, {s.skipped} already scored"
                  + (f" ({s.message})" if s.message else ""))
    for name in run.without_model:
        print(f"  {name}: skipped, no active model")
    for name, error in run.errors.items():
        print(f"  {name}: not scheduled: {error}", file=sys.stderr)
    if not run.jobs and not run.without_model and not run.errors:
        print("  no products registered")
    status = _maybe_wait(a, [s.job_id for s in run.jobs])
    return 1 if run.errors else status


def cmd_jobs(a: argparse.Namespace) -> int:
    from totalrecall.jobs_view import format_failures, format_jobs, format_warnings, load_jobs

    views = load_jobs([a.job_id] if a.job_id is not None else None, limit=a.limit)
    if a.job_id is not None and not views:
        raise LookupError(f"no job {a.job_id}")
    print(format_jobs(views) if views else "no jobs yet")
    if a.job_id is not None:
        if views[0].median_score is not None:
            print(f"job {a.job_id}: median image score {views[0].median_score:.4g}")
        if views[0].warning:
            print(format_warnings(views))
        print(format_failures(a.job_id))
    return 0


def _maybe_wait(a: argparse.Namespace, job_ids: list[int]) -> int:
    """With --wait: follow the jobs to the end; exit status 1 if a job failed, or none of its images
    could be scored."""
    from totalrecall.jobs_view import format_failures, format_jobs, format_warnings, wait_for_jobs

    if not a.wait or not job_ids:
        return 0
    views = wait_for_jobs(job_ids)
    print(format_jobs(views))
    if any(v.warning for v in views):
        print(format_warnings(views), file=sys.stderr)
    for v in views:
        if v.failed:
            print(format_failures(v.id, limit=20))
    failed = [v.id for v in views if v.status == "failed"]
    if failed:
        print(f"failed job(s): {', '.join(map(str, failed))}", file=sys.stderr)
    nothing = [v.id for v in views if v.status != "failed" and v.failed and not v.done]
    if nothing:
        print(f"job(s) in which no image could be scored: {', '.join(map(str, nothing))}", file=sys.stderr)
    return 1 if failed or nothing else 0


def _require_broker() -> None:
    from common.settings import get_settings

    if get_settings().tasks_in_process:
        raise ValueError("TOTALRECALL_BROKER_URL is not set: tasks run in-process, there is nothing to "
                         "serve (set it to a Redis URL to run workers)")


def cmd_worker(a: argparse.Namespace) -> int:
    _require_broker()
    from workers.app import app

    # a unique node name by default, so several workers on one machine do not clash (celery@host is
    # Celery's); a container's worker is named by --name, which its liveness probe pings
    argv = ["worker", "-Q", a.queues, "-P", "prefork", "--loglevel", a.loglevel,
            "--hostname", a.name or f"totalrecall-{os.getpid()}@%h"]
    if a.concurrency:
        argv += ["--concurrency", str(a.concurrency)]
    app.worker_main(argv)
    return 0


def cmd_beat(a: argparse.Namespace) -> int:
    _require_broker()
    from common.settings import get_settings
    from workers.app import app

    home = get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--schedule", str(home / "celerybeat-schedule"), "--loglevel", a.loglevel])
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from totalrecall.demo import run_demo

    return run_demo(a.home, a.images)


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _add_operations(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="create or migrate the schema (idempotent)").set_defaults(
        handler=cmd_db_upgrade)

    product = sub.add_parser("product", help="register, change and list product lines")
    product_sub = product.add_subparsers(dest="product_command", required=True)
    add = product_sub.add_parser("add", help="register a product")
    _add_product_options(add, update=False)
    add_model_options(add)
    add.set_defaults(handler=cmd_product_add)
    product_sub.add_parser("list", help="registered products").set_defaults(handler=cmd_product_list)
    update = product_sub.add_parser("set", help="change a product's folders or fit settings (used by its next fit)")
    _add_product_options(update, update=True)
    add_model_options(update, defaults=False)
    update.set_defaults(handler=cmd_product_set)

    model = sub.add_parser("model", help="a product's model versions: list them, choose the active one")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    listing = model_sub.add_parser("list", help="model versions of a product, newest first")
    listing.add_argument("name")
    listing.set_defaults(handler=cmd_model_list)
    activate = model_sub.add_parser("activate", help="make a ready model version the active one (roll back)")
    activate.add_argument("name")
    activate.add_argument("version", type=int)
    activate.set_defaults(handler=cmd_model_activate)
    pause = model_sub.add_parser("deactivate", help="leave a product without an active model (pauses its nightly)")
    pause.add_argument("name")
    pause.set_defaults(handler=cmd_model_deactivate)

    fit = sub.add_parser("fit", help="fit products (one job each, queue 'fit')")
    fit.add_argument("names", nargs="*", metavar="NAME")
    fit.add_argument("--all", action="store_true", help="every registered product")
    _add_wait(fit)
    fit.set_defaults(handler=cmd_fit)

    score = sub.add_parser("score", help="score a folder of images with a product's active model")
    score.add_argument("name")
    score.add_argument("--images", required=True, help="folder URI (s3://bucket/prefix/ or a path)")
    _add_wait(score)
    score.set_defaults(handler=cmd_score)

    nightly = sub.add_parser("nightly", help="schedule the nightly inspection now")
    nightly.add_argument("--date", type=_iso_date, default=None, help="YYYY-MM-DD (default: yesterday, UTC)")
    _add_wait(nightly)
    nightly.set_defaults(handler=cmd_nightly)

    jobs = sub.add_parser("jobs", help="recent jobs, or one job with its failed images")
    jobs.add_argument("job_id", nargs="?", type=int, metavar="JOB_ID")
    jobs.add_argument("--limit", type=_positive_int, default=20, help="the most recent N jobs")
    jobs.set_defaults(handler=cmd_jobs)

    worker = sub.add_parser("worker", help="run a Celery worker (needs TOTALRECALL_BROKER_URL)")
    worker.add_argument("--queues", default="fit,score", help="comma-separated: fit, score")
    worker.add_argument("--concurrency", type=int, default=None, help="processes (default: CPU count)")
    worker.add_argument("--name", default=None, metavar="NODE",
                        help="Celery node name, %%h for the host name (default: totalrecall-PID@%%h); "
                             "`celery --app workers.app inspect ping --destination NODE` pings it")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=cmd_worker)

    beat = sub.add_parser("beat", help="run the scheduler that starts the nightly inspection")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(handler=cmd_beat)

    demo = sub.add_parser("demo", help="end-to-end demo on generated images, no services needed")
    demo.add_argument("--home", default=None, help="data folder (default: TOTALRECALL_HOME or "
                      "./totalrecall-data)")
    demo.add_argument("--images", type=int, default=40, help="archive images to inspect")
    demo.set_defaults(handler=cmd_demo)


def _add_product_options(p: argparse.ArgumentParser, update: bool) -> None:
    """A product's name, folders and threshold rule: the folders required by `product add`; in `product
    set` every option is optional, and one not given is absent from the parsed arguments."""
    p.add_argument("name")
    p.add_argument("--train", required=not update, default=None, help="folder URI of nominal training images")
    p.add_argument("--archive", required=not update, default=None,
                   help="folder URI template of the daily archive, with {date} (YYYY-MM-DD)")
    p.add_argument("--validation", default=None, help="folder URI of labelled validation images (good/, "
                   "<defect type>/, optional ground_truth/<type>/<stem>_mask.png): each fit then sets "
                   "F1-optimal thresholds" + ("; an empty string removes it" if update else ""))
    p.add_argument("--max-false-alarms", type=_fraction_or_none, default=argparse.SUPPRESS if update else None,
                   help="with --validation: the image threshold flags at most this fraction of the nominal "
                   "images (e.g. 0.01) instead of being F1-optimal" + ("; none: F1 again" if update else ""))
    p.add_argument("--roi", default=None, metavar="IMAGE_URI", help="region of interest: an image whose white "
                   "pixels are the part of every image inspected (drawn on one of the product's images; scaled "
                   "to each image's size)" + ("; an empty string removes it" if update else ""))


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="follow the job(s) to the end; exit 1 if one failed or scored none of its images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="totalrecall", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log events at this level and above to stderr, one key=value line each "
                             "(worker and beat: their --loglevel)")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="fit and evaluate on a dataset in MVTec AD layout")
    ev.add_argument("--data", required=True, help="dataset root (DIR/NAME/train/good ...)")
    ev.add_argument("--category", required=True)
    ev.add_argument("--shots", type=int, default=None, help="fit on K training images only")
    ev.add_argument("--json", default=None, help="write the report here")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--roi", default=None, metavar="IMAGE", help="region of interest image (white: inspected); "
                    "defect pixels outside it count as missed")
    add_model_options(ev)
    ev.set_defaults(handler=cmd_evaluate)
    _add_operations(sub)
    add_report_command(sub)
    add_review_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from common.logs import setup_logging
    from common.settings import redact_text
    from common.storage import StorageError

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        with keep_interrupts():
            status = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's exit
        return status
    except KeyboardInterrupt:
        print("interrupted: work sent to workers goes on (see `totalrecall jobs`); a job this command was "
              "running in-process is marked failed", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `totalrecall jobs | head`: the reader has gone, and so can we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError, RuntimeError, LookupError, StorageError) as exc:  # e.g. --out into a file
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except OverflowError as exc:  # e.g. a job id beyond the database's 64-bit integers
        print(f"error: a number given is too large ({exc})", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"error: database: {_database_hint(exc)}", file=sys.stderr)
        return 2


def _database_hint(exc: Exception) -> str:
    from common.settings import redact_text

    message = redact_text(str(getattr(exc, "orig", None) or exc)).strip().splitlines()[0]
    if "no such table" in message or "does not exist" in message:
        message += " (run `totalrecall db upgrade`)"
    return message


if __name__ == "__main__":
    sys.exit(main())
