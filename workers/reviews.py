"""What a fit takes from inspector reviews (`scheduler.reviews`).

- Images reviewed `good` (false alarms) go into the new model's memory bank.
- Images reviewed `defective` (confirmed defects) are scored by the new model once its thresholds are set.
  A confirmed defect that was flagged the last time it was scored (normally by the active version) and
  that the new model does not flag is a regression, and keeps the new version from becoming active by
  itself; so does one that can no longer be read (the check cannot vouch for it). A wrong `good` review
  of a defective part is the usual cause: it teaches the model that defect as normal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.db import Result, ResultStatus, Review, ReviewLabel
from common.engine.loader import ImageSource
from common.engine.patchcore import PatchCore


@dataclass(frozen=True)
class Confirmed:
    """An image reviewed defective, and whether it was flagged the last time it was scored (None: every
    attempt to score it failed)."""

    uri: str
    flagged_before: bool | None


def reviewed_good(session: Session, product_id: int) -> tuple[str, ...]:
    """The product's images reviewed good, sorted."""
    return tuple(session.scalars(select(Review.image_uri).where(
        Review.product_id == product_id, Review.label == ReviewLabel.GOOD.value).order_by(Review.image_uri)))


def confirmed_defects(session: Session, product_id: int) -> tuple[Confirmed, ...]:
    """The product's images reviewed defective, sorted, with the latest verdict on each."""
    latest = (select(Result.image_uri, func.max(Result.id).label("id"))
              .where(Result.product_id == product_id, Result.status == ResultStatus.OK.value)
              .group_by(Result.image_uri).subquery())
    rows = session.execute(select(Review.image_uri, Result.is_anomalous)
                           .outerjoin(latest, latest.c.image_uri == Review.image_uri)
                           .outerjoin(Result, Result.id == latest.c.id)
                           .where(Review.product_id == product_id, Review.label == ReviewLabel.DEFECTIVE.value)
                           .order_by(Review.image_uri))
    return tuple(Confirmed(uri, flagged) for uri, flagged in rows)


def check_confirmed(model: PatchCore, confirmed: Sequence[Confirmed],
                    loader: Callable[[str], ImageSource]) -> dict[str, Any]:
    """Score the confirmed defects with the fitted `model`: counts, unreadable images, `missed`, the URIs
    that were flagged the last time and that this model does not flag, and `unverified`, those flagged the
    last time that could not be scored now (so the regression check cannot vouch for them)."""
    results = model.predict([loader(c.uri) for c in confirmed])
    failed = [{"uri": c.uri, "error": r.error} for c, r in zip(confirmed, results, strict=True) if not r.ok]
    flagged = {c.uri: bool(r.is_anomalous) for c, r in zip(confirmed, results, strict=True) if r.ok}
    return {
        "images": len(confirmed),
        "flagged": sum(flagged.values()),
        "failed": failed,
        "missed": [c.uri for c in confirmed if c.flagged_before and flagged.get(c.uri) is False],
        "unverified": [c.uri for c in confirmed if c.flagged_before and c.uri not in flagged],
    }
