"""Fit a product's model on its training images and publish it as a new model version.

Training images: the product's training folder, plus the archived images an operator reviewed as good
(`scheduler.reviews`: false alarms the model must learn), which always go into the memory bank and are
never held out (`workers.reviews`).

Thresholds: the nominal rule on held-out training images, or F1-optimal ones when the product has
labelled validation images (`workers.validation`).

Activation rule (`check_validation`): a fitted version becomes the product's active model only if its
thresholds were calibrated on held-out images (at least one held-out image scored, so not in-sample), at
most `MAX_FAILED_FRACTION` of the training folder's images failed to load (unreadable images reviewed
good are failures of the fit but not counted here), and it flags every image reviewed defective that was
flagged the last time it was scored, all of them readable (`workers.reviews`). Otherwise it is kept
`ready` but inactive, and the job says why. A passing version is not activated either when a newer version
of the product is active already (two fits overlapped, and the older one finished last): the job says so.
A failed fit leaves its version `failed`, never active.

A redelivered fit task reuses the version row its first attempt created (the job points to it), so a
worker dying mid-fit never leaves a second half-made version behind.

Publishing (upload of the artifact, then the version row) happens with the job row locked and only while
the version is still `training`: two attempts of one fit (a task redelivered while its first worker was
still running) never overwrite each other's artifact, and the version that becomes active always has the
complete artifact whose sha256 it records. A worker dying mid-upload leaves the version `training`
(nothing references the partial upload); the redelivered task uploads again. (On SQLite the lock is the
whole database's write lock: other writers wait for the upload, up to the busy timeout and then
`in_transaction`'s retries; fine for the embedded default's local folder, slow for large banks on S3.)
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.db import (
    Job,
    JobStatus,
    ModelStatus,
    ModelVersion,
    activate_model_version,
    in_transaction,
    lock_product,
    utcnow,
)
from common.engine.artifact import BANK_FILE, META_FILE
from common.engine.config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from common.engine.roi import RegionOfInterest
from common.images import IMAGE_SUFFIXES
from common.logs import log_context, log_event
from common.settings import get_settings
from common.storage import StorageError, StorageUnavailable, list_uris, open_storage, read_uri, real_location
from workers.job_state import describe_error, fail_locked_job, lock_job, name_failures
from workers.reviews import Confirmed, check_confirmed, confirmed_defects, reviewed_good
from workers.validation import ValidationSet, calibrate_on_validation_set, list_validation_set

logger = logging.getLogger(__name__)

MAX_FAILED_FRACTION = 0.10
ACTIVATION_RULE = (f"active only if calibrated on >= 1 held-out image, <= {MAX_FAILED_FRACTION:.0%} "
                   "of the training images failed, and no confirmed defect flagged when last scored is "
                   "missed")


class FitError(RuntimeError):
    """The product cannot be fitted as configured (e.g. no training images)."""


@dataclass(frozen=True)
class FitTarget:
    job_id: int
    product: str
    train_uri: str
    fit_config: dict[str, Any]
    version_id: int
    version: int
    validation_uri: str | None = None
    max_false_alarms: float | None = None
    reviewed_good: tuple[str, ...] = ()  # images reviewed good: bank only, never held out
    confirmed: tuple[Confirmed, ...] = ()  # images reviewed defective: those flagged must stay flagged
    roi_uri: str | None = None  # region of interest image (`common.engine.roi`)


@dataclass(frozen=True)
class FitOutcome:
    version: int
    sha256: str
    activated: bool
    reason: str
    images: int = 0  # training images listed
    failed: int = 0  # of which could not be loaded


def fit_job(job_id: int) -> FitOutcome | None:
    """Run the fit job; None if it had already finished (a redelivered task)."""
    started = time.monotonic()
    target = start_fit(job_id)
    if target is None:
        log_event(logger, logging.INFO, "fit_skipped", job=job_id, reason="the job has already finished")
        return None
    with log_context(job=target.job_id, product=target.product, version=target.version):
        try:
            outcome = _fit_and_publish(target)
        except Exception as exc:  # the task retries the fit or fails the job
            log_event(logger, logging.WARNING, "fit_failed", seconds=time.monotonic() - started,
                      error=describe_error(exc))
            raise
        if outcome is None:
            log_event(logger, logging.INFO, "fit_skipped", reason="another attempt published this fit")
        else:
            log_event(logger, logging.INFO, "fit_finished", images=outcome.images, failed=outcome.failed,
                      activated=outcome.activated, sha256=outcome.sha256[:12],
                      seconds=time.monotonic() - started, reason=outcome.reason)
    return outcome


def _fit_and_publish(target: FitTarget) -> FitOutcome | None:
    """Fit on the product's training images and publish the version; None if another attempt did."""
    listed = list_uris(target.train_uri, IMAGE_SUFFIXES, refuse_unreadable=True)
    if not listed:
        raise FitError(f"no training images under {target.train_uri}")
    # Reviews outrank the folder: an image reviewed defective never enters a bank, and one reviewed good
    # always does and is never held out, wherever it lies.
    defective, reviewed = {c.uri for c in target.confirmed}, list(target.reviewed_good)
    good = set(reviewed)
    train = [u for u in listed if u not in defective and u not in good]
    if not train:
        raise FitError(f"every training image under {target.train_uri} is reviewed: a fit needs images "
                       "that are not, to hold some out and calibrate its thresholds")
    in_train = set(train)
    uris = train + reviewed
    config = PatchCoreConfig.from_dict(target.fit_config)
    validation = list_validation_set(target.validation_uri) if target.validation_uri else None  # fail early
    _check_apart_from_training(uris, validation, target.roi_uri)
    max_bytes = get_settings().max_image_bytes
    roi = _read_roi(target.roi_uri, max_bytes) if target.roi_uri else None
    left_out = sum(u in defective for u in listed)
    log_event(logger, logging.INFO, "fit_started", images=len(uris), reviewed_good=len(reviewed),
              reviewed_defective_left_out=left_out, backbone=config.backbone, image_size=config.image_size,
              roi=target.roi_uri)
    model = PatchCore(config, roi=roi)
    stats = model.fit([_loader(uri, max_bytes) for uri in train],
                      bank_only=[_loader(uri, max_bytes) for uri in reviewed])
    stats["failed_images"] = failures = name_failures(stats["failed_images"], uris)
    unreadable_reviewed = [f for f in failures if f["uri"] not in in_train]
    for failure in unreadable_reviewed:  # say why the fit read a file outside its training folder
        failure["error"] += " (an image reviewed good: restore it, or `totalrecall review clear` it)"
    stats["reviewed_good_images"] = len(reviewed) - len(unreadable_reviewed)  # those in the bank
    stats["reviewed_good_failed"] = len(unreadable_reviewed)
    stats["reviewed_defective_left_out"] = left_out  # of the training folder's images
    if validation is not None:
        summary = calibrate_on_validation_set(model, validation, lambda u: _loader(u, max_bytes), max_bytes,
                                              target.max_false_alarms)
        log_event(logger, logging.INFO, "fit_calibrated", nominal=summary["nominal"],
                  defective=summary["defective"], with_mask=summary["defective_with_mask"],
                  failed=len(summary["failed_images"]), image_threshold=model.image_threshold,
                  pixel_threshold=model.pixel_threshold)
    if target.confirmed:
        stats["confirmed_defects"] = check_confirmed(model, target.confirmed, lambda u: _loader(u, max_bytes))
        checked = stats["confirmed_defects"]
        log_event(logger, logging.INFO, "fit_checked_confirmed_defects", images=checked["images"],
                  flagged=checked["flagged"], failed=len(checked["failed"]), missed=len(checked["missed"]))
    passed, reason = check_validation(stats, model, len(train))
    with TemporaryDirectory(prefix="totalrecall-fit-") as tmp:
        sha256 = model.save(tmp)
        inactive = publish(target, Path(tmp), model, stats, sha256, passed, reason, len(uris))
    if inactive is None:
        return None
    failed = len(stats.get("failed_images", []))
    return FitOutcome(target.version, sha256, not inactive, inactive or reason, len(uris), failed)


def _check_apart_from_training(bank: list[str], validation: ValidationSet | None, roi_uri: str | None) -> None:
    """No image for the memory bank (training images, images reviewed good) may be a validation image, a
    defect mask or the region of interest. `product add` and `set` refuse nested folders, but a link in
    the training folder can still lead there (as can the folders of a product stored before that check),
    and an image of the validation folder can be reviewed good."""
    others = [*validation.images, *(m for m in validation.masks if m)] if validation else []
    if roi_uri:
        others.append(roi_uri)
    if not others:
        return
    elsewhere = {real_location(u) for u in others}
    shared = [u for u in bank if real_location(u) in elsewhere]
    if shared:
        raise FitError(f"{len(shared)} training image(s) are also validation images, defect masks or the region "
                       f"of interest, e.g. {shared[0]} (a link in the training folder, or an image reviewed "
                       "good?): every training image and image reviewed good enters the memory bank; move or "
                       "unlink them, or `totalrecall review clear` the review")


def _read_roi(uri: str, max_bytes: int) -> RegionOfInterest:
    try:
        return RegionOfInterest.from_image(read_uri(uri, max_bytes))
    except StorageUnavailable:
        raise  # transient: the task retries
    except (StorageError, ValueError, OSError) as exc:
        raise FitError(f"region of interest {uri}: {describe_error(exc)}") from exc


def _loader(uri: str, max_bytes: int) -> Callable[[], bytes]:
    delay = get_settings().test_chunk_delay

    def load() -> bytes:
        if delay:
            time.sleep(delay)  # fault-injection tests only
        return read_uri(uri, max_bytes)

    return load


def start_fit(job_id: int) -> FitTarget | None:
    """Mark the job running and create (or, on redelivery, reuse) its `training` model version."""

    def work(session: Session) -> FitTarget | None:
        job = lock_job(session, job_id)
        if job.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value):
            return None
        version = job.model_version
        if version is None or version.status != ModelStatus.TRAINING.value:
            version = _new_version(session, job)
        job.status, job.started_at = JobStatus.RUNNING.value, job.started_at or utcnow()
        product = job.product
        return FitTarget(job.id, product.name, product.train_uri, dict(product.fit_config),
                         version.id, version.version, product.validation_uri, product.max_false_alarms,
                         reviewed_good(session, product.id), confirmed_defects(session, product.id),
                         product.roi_uri)

    for attempt in range(3):
        try:
            return in_transaction(work)
        except IntegrityError:  # another fit of the product took the same version number: renumber
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _new_version(session: Session, job: Job) -> ModelVersion:
    latest = session.scalar(select(func.max(ModelVersion.version))
                            .where(ModelVersion.product_id == job.product_id))
    version = ModelVersion(product_id=job.product_id, version=(latest or 0) + 1,
                           config=dict(job.product.fit_config), status=ModelStatus.TRAINING.value)
    session.add(version)
    session.flush()
    job.model_version_id = version.id
    return version


def upload_artifact(folder: Path, product: str, version: int) -> str:
    """Upload the artifact under models/<product>/<version>/; returns that folder's URI.

    The bank goes first and model.json last, so a model.json in storage means a complete artifact.
    """
    store = open_storage(get_settings().storage_url)
    prefix = f"models/{product}/{version}/"
    store.put_file(prefix + BANK_FILE, folder / BANK_FILE)
    meta_uri = store.put_file(prefix + META_FILE, folder / META_FILE, "application/json")
    return meta_uri.rsplit("/", 1)[0]


def check_validation(stats: dict[str, Any], model: PatchCore, n_images: int) -> tuple[bool, str]:
    """(passed, reason) of the activation rule (see the module docstring), for a fit on `n_images` of the
    training folder. Images reviewed good that could not be read are failures of the fit, but do not
    count against the training folder's share."""
    failed = len(stats.get("failed_images", [])) - stats.get("reviewed_good_failed", 0)
    if stats.get("holdout_images", 0) < 1:
        return False, "thresholds were calibrated in-sample (no held-out image scored)"
    if failed > MAX_FAILED_FRACTION * n_images:
        return False, f"{failed} of {n_images} training images failed (> {MAX_FAILED_FRACTION:.0%})"
    if not (math.isfinite(model.image_threshold) and math.isfinite(model.pixel_threshold)):
        return False, "calibration produced no finite thresholds"
    missed = stats.get("confirmed_defects", {}).get("missed", [])
    if missed:
        return False, (f"misses {len(missed)} confirmed defect(s) flagged when last scored, e.g. {missed[0]} "
                       "(an image of that defect reviewed good, or a region of interest that leaves it out? "
                       "see `totalrecall review list`)")
    unverified = stats.get("confirmed_defects", {}).get("unverified", [])
    if unverified:
        return False, (f"cannot score {len(unverified)} confirmed defect(s) flagged when last scored, e.g. "
                       f"{unverified[0]}: the regression check needs them (restore the image, or "
                       "`totalrecall review clear` it)")
    return True, f"{stats['holdout_images']} held-out images scored, {failed} of {n_images} failed"


def publish(target: FitTarget, folder: Path, model: PatchCore, stats: dict[str, Any], sha256: str,
            passed: bool, reason: str, n_images: int) -> str | None:
    """Upload the artifact and record the version, with the job locked; returns why the version was left
    inactive ("" if it was activated), None if another attempt published it."""

    def work(session: Session) -> str | None:
        job = lock_job(session, target.job_id)
        version = session.get(ModelVersion, target.version_id)
        if job.status != JobStatus.RUNNING.value or version.status != ModelStatus.TRAINING.value:
            return None  # a duplicate attempt published (or failed) this fit already
        artifact_uri = upload_artifact(folder, target.product, target.version)
        return finish_fit(session, job, version, model, stats, sha256, artifact_uri, passed, reason, n_images)

    return in_transaction(work)


def finish_fit(session: Session, job: Job, version: ModelVersion, model: PatchCore, stats: dict[str, Any],
               sha256: str, artifact_uri: str, passed: bool, reason: str, n_images: int) -> str:
    """Record the ready version (activating it if it passed and no newer version is active) and the job's
    outcome (job row locked); returns why the version was left inactive ("": it was activated)."""
    # the product before the version's row (written below): the order of `model activate`, so the two never
    # wait for each other; and a newer fit publishing meanwhile commits first, seen below
    lock_product(session, version.product_id)
    version.status, version.error = ModelStatus.READY.value, None
    version.sha256, version.artifact_uri = sha256, artifact_uri
    version.config = model.config.to_dict()
    version.image_threshold, version.pixel_threshold = model.image_threshold, model.pixel_threshold
    nominal = stats.get("holdout_scores") or []
    version.nominal_median_score = float(statistics.median(nominal)) if nominal else None
    version.train_image_count = int(stats["train_images"])
    activation = {"passed": passed, "rule": ACTIVATION_RULE, "reason": reason}
    inactive = "" if passed else reason
    if passed:
        newer = _newer_active_version(session, version)
        if newer is not None:
            activation["superseded_by"] = newer
            inactive = (f"version {newer}, from a fit started later, is active already (`totalrecall model "
                        f"activate {job.product.name} {version.version}` makes this one active)")
    version.validation = {**stats, "activation": activation}
    session.flush()
    if not inactive:
        activate_model_version(session, version)
    failed = len(stats.get("failed_images", []))
    job.total, job.done, job.failed = n_images, n_images - failed, failed
    job.status, job.finished_at = JobStatus.SUCCEEDED.value, utcnow()
    job.error = f"model version {version.version} is ready but not active: {inactive}" if inactive else None
    return inactive


def _newer_active_version(session: Session, version: ModelVersion) -> int | None:
    """The product's active version if it is numbered above `version` (a newer one that missed its own
    activation rule does not hold an older passing one back)."""
    return session.scalar(select(ModelVersion.version).where(
        ModelVersion.product_id == version.product_id, ModelVersion.version > version.version,
        ModelVersion.is_active))


def fail_fit(job_id: int, error: str) -> str | None:
    """Mark the job failed and its unfinished model version failed (and so never active); returns the
    product's name if it did. A fit that has succeeded (a late duplicate attempt failing) is left alone.
    """

    def work(session: Session) -> str | None:
        job = fail_locked_job(session, job_id, error)
        if job is None:
            return None
        version = job.model_version
        if version is not None and version.status == ModelStatus.TRAINING.value:
            version.status, version.error, version.is_active = ModelStatus.FAILED.value, error, False
        return job.product.name

    return in_transaction(work)
