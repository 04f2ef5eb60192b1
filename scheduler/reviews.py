"""Operator reviews: an inspector's verdict on scored images, the way a false alarm is fed back.

Only an image that has a result for the product can be reviewed, and it carries one verdict, the latest
(`reviews` is unique per product and image). A review changes no result row: results stay what the model
said, and the `anomaly_history` view shows the verdict next to them, so flag precision can be queried in
SQL. What a review changes is the next fit: images reviewed `good` join the memory bank of the product's
next model (never its held-out calibration images), so an appearance the training images lacked stops
being flagged (`workers.fitting`). Images reviewed `defective` are recorded for the history and for
building a labelled validation folder; they never enter a fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from common.db import Product, Result, ResultStatus, Review, ReviewLabel, in_chunks, in_transaction, utcnow
from common.logs import log_event
from common.storage import absolute_uri
from scheduler.products import SchedulingError, get_product

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReviewInfo:
    image_uri: str
    label: str
    defect_type: str | None
    note: str | None
    reviewed_by: str | None
    reviewed_at: datetime | None


def mark(product_name: str, image_uris: Sequence[str], label: str, defect_type: str | None = None,
         note: str | None = None, reviewed_by: str | None = None) -> dict[str, str | None]:
    """Record the verdict `label` for each image (replacing an earlier one); returns each image's previous
    label (None: not reviewed before). All or nothing: an image without a result for the product refuses
    the whole call."""
    if label not in list(ReviewLabel):
        raise SchedulingError(f"unknown verdict {label!r}: use one of {', '.join(ReviewLabel)}")
    if defect_type is not None and label != ReviewLabel.DEFECTIVE:
        raise SchedulingError("a defect type goes with a 'defective' verdict only")
    _check_length("defect type", defect_type, Review.defect_type)
    _check_length("reviewer", reviewed_by, Review.reviewed_by)
    uris = _unique([absolute_uri(u) for u in image_uris])

    def work(session: Session) -> dict[str, str | None]:
        product = get_product(session, product_name)
        _require_results(session, product, uris)
        existing = {r.image_uri: r for part in in_chunks(uris) for r in session.scalars(
            select(Review).where(Review.product_id == product.id, Review.image_uri.in_(part)).with_for_update())}
        before: dict[str, str | None] = {}
        for uri in uris:
            review = existing.get(uri) or Review(product_id=product.id, image_uri=uri)
            before[uri] = review.label
            review.label, review.defect_type, review.note = label, defect_type, note
            review.reviewed_by, review.reviewed_at = reviewed_by, utcnow()
            session.add(review)
        return before

    try:
        before = in_transaction(work)
    except IntegrityError:  # a concurrent review inserted an image's first verdict: this one replaces it
        before = in_transaction(work)
    for uri, previous in before.items():
        log_event(logger, logging.INFO, "image_reviewed", product=product_name, image=uri, label=label,
                  previous=previous, defect_type=defect_type, by=reviewed_by)
    return before


def clear(product_name: str, image_uris: Sequence[str]) -> tuple[int, int]:
    """Remove the images' reviews (a verdict given by mistake); returns how many there were, and how many
    images were given (each image once, however it was written)."""
    uris = _unique([absolute_uri(u) for u in image_uris])

    def work(session: Session) -> int:
        product = get_product(session, product_name)
        return sum(session.execute(delete(Review).where(Review.product_id == product.id,
                                                        Review.image_uri.in_(part))).rowcount for part in in_chunks(uris))

    removed = in_transaction(work)
    log_event(logger, logging.INFO, "reviews_cleared", product=product_name, images=len(uris), removed=removed)
    return removed, len(uris)


def list_reviews(product_name: str, label: str | None = None) -> list[ReviewInfo]:
    """The product's reviews, newest first; only those with `label` when given."""

    def work(session: Session) -> list[ReviewInfo]:
        product = get_product(session, product_name)
        query = select(Review).where(Review.product_id == product.id)
        if label is not None:
            query = query.where(Review.label == label)
        rows = session.scalars(query.order_by(Review.reviewed_at.desc(), Review.id.desc()))
        return [ReviewInfo(r.image_uri, r.label, r.defect_type, r.note, r.reviewed_by, r.reviewed_at)
                for r in rows]

    return in_transaction(work)


def _require_results(session: Session, product: Product, uris: list[str]) -> None:
    scored: set[str] = set()
    for part in in_chunks(uris):
        scored.update(session.scalars(select(Result.image_uri).distinct().where(
            Result.product_id == product.id, Result.image_uri.in_(part),
            Result.status == ResultStatus.OK.value)))
    missing = [u for u in uris if u not in scored]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SchedulingError(f"no successful result of product {product.name!r} for {shown}: only scored "
                              "images can be reviewed (image URIs as `anomaly_history` shows them; one that "
                              "failed to score cannot be learned from); nothing was recorded")


def _check_length(what: str, value: str | None, column: InstrumentedAttribute[str | None]) -> None:
    """PostgreSQL refuses a string longer than its column (SQLite would store it): refused up front."""
    limit = column.type.length
    if value is not None and len(value) > limit:
        raise SchedulingError(f"the {what} is {len(value)} characters long: at most {limit}")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
