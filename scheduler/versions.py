"""A product's model versions: list them, and choose which one is active (roll back, or accept a version
that failed its activation rule after review). Results keep the version that produced them, so switching
changes only what later jobs use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.db import ModelStatus, ModelVersion, activate_model_version, in_transaction, lock_product
from common.logs import log_event
from scheduler.products import SchedulingError, active_version, get_product

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    status: str
    is_active: bool
    created_at: datetime | None
    train_images: int | None  # in the bank; the held-out ones come on top
    holdout_images: int | None
    bank_size: int | None
    image_threshold: float | None
    nominal_median_score: float | None
    activation: dict[str, Any] | None  # the fit's activation rule outcome: passed, reason
    validation_set: dict[str, Any] | None  # labelled images the thresholds were set on (F1), if any
    reviewed_good_images: int | None  # images reviewed good that joined the bank
    reviewed_good_failed: int | None  # images reviewed good that could not be read
    confirmed_defects: dict[str, Any] | None  # images reviewed defective, scored by this version
    roi_fraction: float | None  # of each image inspected; None: the whole image
    error: str | None
    config: dict[str, Any]


def list_versions(product_name: str) -> list[VersionInfo]:
    """Every model version of the product, newest first."""

    def work(session: Session) -> list[VersionInfo]:
        product = get_product(session, product_name)
        rows = session.scalars(select(ModelVersion).where(ModelVersion.product_id == product.id)
                               .order_by(ModelVersion.version.desc()))
        return [_info(v) for v in rows]

    return in_transaction(work)


def activate_version(product_name: str, version: int) -> tuple[int | None, VersionInfo]:
    """Make `version` the product's active model; returns the version active before (None: none) and the
    now active one. Only a ready version (fitted, artifact published) can be active."""

    def work(session: Session) -> tuple[int | None, VersionInfo]:
        product = get_product(session, product_name)
        # the product first, then the version: the order of deactivate and of a publishing fit, so that
        # none of them waits for the other in a deadlock; "before" is read under the lock
        lock_product(session, product.id)
        target = session.scalars(select(ModelVersion).where(
            ModelVersion.product_id == product.id, ModelVersion.version == version).with_for_update(key_share=True)
        ).one_or_none()
        if target is None:
            raise SchedulingError(f"product {product_name!r} has no model version {version} "
                                  f"(see `totalrecall model list {product_name}`)")
        if target.status != ModelStatus.READY.value:
            raise SchedulingError(f"model version {version} of {product_name!r} is {target.status}"
                                  + (f" ({target.error})" if target.error else "")
                                  + "; only a ready version can be active")
        before = active_version(session, product)
        activate_model_version(session, target)
        return (before.version if before else None), _info(target)

    previous, info = in_transaction(work)
    log_event(logger, logging.INFO, "model_activated", product=product_name, version=version, previous=previous)
    return previous, info


def deactivate(product_name: str) -> int | None:
    """Leave the product without an active model, which pauses its nightly inspection and refuses its
    ad-hoc scoring until a version is activated (or a fit passes); returns the version that was active."""

    def work(session: Session) -> int | None:
        product = get_product(session, product_name)
        lock_product(session, product.id)  # an activation waits for this one, not commits in between
        before = active_version(session, product)
        session.execute(update(ModelVersion).where(ModelVersion.product_id == product.id, ModelVersion.is_active)
                        .values(is_active=False).execution_options(synchronize_session="fetch"))
        return before.version if before else None

    previous = in_transaction(work)
    log_event(logger, logging.INFO, "model_deactivated", product=product_name, previous=previous)
    return previous


def _info(v: ModelVersion) -> VersionInfo:
    validation = v.validation or {}
    return VersionInfo(
        version=v.version, status=v.status, is_active=v.is_active, created_at=v.created_at,
        train_images=v.train_image_count, holdout_images=validation.get("holdout_images"),
        bank_size=validation.get("bank_size"), image_threshold=v.image_threshold,
        nominal_median_score=v.nominal_median_score, activation=validation.get("activation"),
        validation_set=validation.get("validation_set"), reviewed_good_images=validation.get("reviewed_good_images"),
        reviewed_good_failed=validation.get("reviewed_good_failed"),
        confirmed_defects=validation.get("confirmed_defects"), roi_fraction=validation.get("roi_fraction"),
        error=v.error, config=dict(v.config or {}))
