"""Score drift: has a whole run of images moved away from what the model calls nominal?

Most images of a nightly run are good parts, so the run's median image score sits where the model's
held-out nominal images scored at fit time. When the camera, the lighting or the product changes, every
image scores higher, and the model flags good parts by the hundred: that calls for a refit, not for a
defect hunt. The check compares the run's median with the model's nominal median, in units of the
distance from that median to the image threshold:

    level = (run median - nominal median) / (image threshold - nominal median)

0 is a run like the held-out images, 1 a run whose typical image sits on the threshold. A score job whose
level reaches `TOTALRECALL_DRIFT_LEVEL` (default 0.5) succeeds with a warning, kept in `jobs.warning`.
"""

from __future__ import annotations


def drift_level(run_median: float, nominal_median: float, image_threshold: float) -> float | None:
    """How far the run's median has moved toward the threshold (see module docstring); None when the
    model gives no usable reference (threshold not above its nominal median)."""
    span = image_threshold - nominal_median
    if not span > 0:
        return None
    return (run_median - nominal_median) / span


def drift_warning(run_median: float | None, nominal_median: float | None, image_threshold: float | None,
                  limit: float) -> str | None:
    """The warning for a score job, or None (no drift, no reference, or the check is off: limit 0)."""
    if limit <= 0 or run_median is None or nominal_median is None or image_threshold is None:
        return None
    level = drift_level(run_median, nominal_median, image_threshold)
    if level is None or level < limit:
        return None
    return (f"score drift: the median image score {run_median:.4g} is {level:.0%} of the way from the model's "
            f"nominal median {nominal_median:.4g} to its threshold {image_threshold:.4g} (warning from "
            f"{limit:.0%}): a changed camera, lighting or product is likelier than that many defects; "
            "check the flagged images and refit the model if the parts are good")
