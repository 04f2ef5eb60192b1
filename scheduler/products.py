"""Product registry: register product lines and look them up with clear errors."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.db import ModelStatus, ModelVersion, Product, session_scope
from common.engine.config import PatchCoreConfig
from common.storage import absolute_uri

# Product names become storage key segments (models/<name>/..., results/<name>/...); whole-string match
# (fullmatch: `$` would let a trailing newline through).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class Unset(Enum):
    """Marks an argument that was not given, where None is a value."""

    TOKEN = 0


UNSET = Unset.TOKEN


class SchedulingError(ValueError):
    """A request that cannot be scheduled (unknown product, no active model ...); nothing was enqueued."""


@dataclass(frozen=True)
class ProductInfo:
    name: str
    train_uri: str
    archive_uri_template: str
    fit_config: dict[str, Any]
    active_version: int | None
    validation_uri: str | None = None
    max_false_alarms: float | None = None
    roi_uri: str | None = None


def add_product(name: str, train_uri: str, archive_uri_template: str, config: PatchCoreConfig,
                validation_uri: str | None = None, max_false_alarms: float | None = None,
                roi_uri: str | None = None) -> int:
    """Register a product; returns its id. The archive template must contain `{date}`. `validation_uri`:
    labelled validation images (`workers.validation`), from which each fit sets F1-optimal thresholds, or
    an image threshold flagging at most `max_false_alarms` of the nominal images."""
    if not _NAME.fullmatch(name):
        raise SchedulingError(f"invalid product name {name!r}: use letters, digits, '.', '_' and '-' "
                              "(it becomes part of storage keys)")
    check_not_empty(train=train_uri, archive=archive_uri_template)
    archive = _archive_template(archive_uri_template)
    _check_false_alarms(max_false_alarms)
    _check_false_alarms_have_validation(max_false_alarms, validation_uri)
    _check_roi(config.center_crop, roi_uri)
    _check_folders_apart(absolute_uri(train_uri), archive, _optional_uri(validation_uri), _optional_uri(roi_uri))
    config.check_new()
    try:
        with session_scope() as session:
            _check_name_free(session, name)
            product = Product(name=name, train_uri=absolute_uri(train_uri), archive_uri_template=archive,
                              validation_uri=_optional_uri(validation_uri), max_false_alarms=max_false_alarms,
                              roi_uri=_optional_uri(roi_uri),
                              fit_config=config.to_dict())
            session.add(product)
            session.flush()
            return product.id
    except IntegrityError:  # a concurrent call registered the name, or one differing only in case, first
        pass
    with session_scope() as session:
        _check_name_free(session, name)  # raises, naming the product that has it
    raise SchedulingError(f"product {name!r} already exists")


def _check_name_free(session: Session, name: str) -> None:
    """SchedulingError if a product has this name, or one differing from it only in case (names become
    storage keys: P2 and p2 would share files on some disks)."""
    taken = session.scalar(select(Product.name).where(func.lower(Product.name) == name.lower()))
    if taken is not None:
        raise SchedulingError(f"product {taken!r} already exists" + (
            f" (names may not differ only in case: {name!r})" if taken != name else ""))


def update_product(name: str, train_uri: str | None = None, archive_uri_template: str | None = None,
                   settings: dict[str, Any] | None = None, validation_uri: str | None = None,
                   max_false_alarms: float | None | Unset = UNSET,
                   roi_uri: str | None = None) -> dict[str, tuple[Any, Any]]:
    """Change a product's training folder, archive template, validation folder ("" removes it), false-alarm
    budget (None: F1 again), region of interest ("" removes it) or fit settings (`PatchCoreConfig` fields);
    the next fit uses them, model versions already fitted keep theirs. Returns {what: (before, after)} for
    what changed. Nothing is written unless every change is valid."""
    check_not_empty(train=train_uri, archive=archive_uri_template)
    archive = _archive_template(archive_uri_template) if archive_uri_template is not None else None
    if not isinstance(max_false_alarms, Unset):
        _check_false_alarms(max_false_alarms)
    wanted: dict[str, tuple[str, Any]] = {}  # what -> (Product attribute, new value), for those given
    if train_uri is not None:
        wanted["train"] = ("train_uri", absolute_uri(train_uri))
    if archive is not None:
        wanted["archive"] = ("archive_uri_template", archive)
    if validation_uri is not None:
        wanted["validation"] = ("validation_uri", _optional_uri(validation_uri))
    if roi_uri is not None:
        wanted["roi"] = ("roi_uri", _optional_uri(roi_uri))
    if not isinstance(max_false_alarms, Unset):
        wanted["max_false_alarms"] = ("max_false_alarms", max_false_alarms)
    with session_scope() as session:
        product = get_product(session, name)
        changes: dict[str, tuple[Any, Any]] = {}
        for what, (attribute, new) in wanted.items():
            if new != getattr(product, attribute):
                changes[what] = (getattr(product, attribute), new)
                setattr(product, attribute, new)
        if settings:
            # read unchecked: settings stored before a check was added (e.g. seed -1) can still be repaired
            before = {**PatchCoreConfig().to_dict(), **product.fit_config}
            after_config = PatchCoreConfig.from_dict({**before, **settings})  # validates, or raises
            if {"backbone", "layers"} & set(settings):
                after_config.check_new()
            after = after_config.to_dict()
            changes.update({k: (before[k], after[k]) for k in after if after[k] != before[k]})
            product.fit_config = after
        _check_roi(product.fit_config.get("center_crop"), product.roi_uri)  # raising rolls it all back
        _check_folders_apart(product.train_uri, product.archive_uri_template, product.validation_uri,
                             product.roi_uri)
        _check_false_alarms_have_validation(product.max_false_alarms, product.validation_uri)
        return changes


def _optional_uri(uri: str | None) -> str | None:
    """The absolute form of an optional folder or file URI; None for None or "" (none)."""
    return absolute_uri(uri) if uri else None


def _check_folders_apart(train_uri: str, archive_template: str, validation_uri: str | None,
                         roi_uri: str | None = None) -> None:
    """Training images are listed recursively, links followed: a validation or archive folder (or the
    region-of-interest image) inside the training folder would put its images into the memory bank, and a
    training folder inside the validation folder would count training images as validation ones. Refused
    (absolute URIs; local paths compared where their links lead)."""
    train = _as_folder(train_uri)
    if roi_uri and _as_folder(roi_uri).startswith(train):
        raise SchedulingError(f"the region of interest {roi_uri} lies inside the training folder {train_uri}: "
                              "every image under a training folder enters the memory bank; keep it elsewhere")
    if validation_uri:
        validation = _as_folder(validation_uri)
        if validation.startswith(train) or train.startswith(validation):
            inner, outer = (("validation", "training") if validation.startswith(train)
                            else ("training", "validation"))
            raise SchedulingError(
                f"the {inner} folder must not lie inside the {outer} folder, nor be the same folder "
                f"(training {train_uri}, validation {validation_uri}): every image under a training folder "
                "enters the memory bank; give them separate folders")
    if _as_folder(archive_template.partition("{date}")[0] + "x").startswith(train):
        raise SchedulingError(
            f"the archive {archive_template} lies inside the training folder {train_uri}: every image under "
            "a training folder enters the memory bank, archived defects included; give them separate folders")


def _as_folder(uri: str) -> str:
    """`uri` ending in exactly one "/" (S3 lists `train//` as `train/`), a local path where its links lead."""
    if not uri.startswith("s3://"):
        uri = os.path.realpath(uri)
    return uri.rstrip("/") + "/"


def _check_false_alarms(rate: float | None) -> None:
    if rate is not None and not 0 <= rate < 1:
        raise SchedulingError(f"max_false_alarms must be a fraction in [0, 1), e.g. 0.01, not {rate}")


def _check_false_alarms_have_validation(rate: float | None, validation_uri: str | None) -> None:
    if rate is not None and not validation_uri:
        raise SchedulingError("a false-alarm budget sets the image threshold from validation images: "
                              "give the product a validation folder, or set --max-false-alarms none")


def _check_roi(center_crop: int | None, roi_uri: str | None) -> None:
    if roi_uri and center_crop is not None:
        raise SchedulingError("a region of interest covers the whole image and does not combine with a "
                              "center crop (which already limits what is inspected): use one of them")


def check_not_empty(**uris: str | None) -> None:
    """An empty folder would be the working directory: refused (None: not given)."""
    for what, uri in uris.items():
        if uri is not None and not str(uri).strip():
            raise SchedulingError(f"the {what} folder cannot be empty")


def _archive_template(template: str) -> str:
    """The template's absolute form, which must still contain `{date}` (normalising `{date}/..` drops it)."""
    absolute = absolute_uri(template)
    if "{date}" not in absolute:
        shown = repr(template) + (f" ({absolute})" if "{date}" in template else "")
        raise SchedulingError(f"archive template {shown} must contain {{date}} (replaced by YYYY-MM-DD)")
    return absolute


def get_product(session: Session, name: str) -> Product:
    product = session.scalars(select(Product).where(Product.name == name)).one_or_none()
    if product is None:
        raise SchedulingError(f"unknown product {name!r} (see `totalrecall product list`)")
    return product


def active_version(session: Session, product: Product) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.product_id == product.id, ModelVersion.is_active)
    ).one_or_none()


def require_active_version(session: Session, product: Product) -> ModelVersion:
    version = active_version(session, product)
    if version is None:
        ready = session.scalar(select(func.count()).where(ModelVersion.product_id == product.id,
                                                          ModelVersion.status == ModelStatus.READY.value))
        hint = (f"activate one of its {ready} ready version(s) (`totalrecall model list {product.name}`, "
                f"`totalrecall model activate {product.name} VERSION`) or fit it again" if ready
                else f"run `totalrecall fit {product.name}` first")
        raise SchedulingError(f"product {product.name!r} has no active model: {hint}")
    return version


def list_products() -> list[ProductInfo]:
    with session_scope() as session:
        products = session.scalars(select(Product).order_by(Product.name)).all()
        return [
            ProductInfo(p.name, p.train_uri, p.archive_uri_template, p.fit_config,
                        getattr(active_version(session, p), "version", None), p.validation_uri,
                        p.max_false_alarms, p.roi_uri)
            for p in products
        ]
