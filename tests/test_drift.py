"""The score-drift check's arithmetic (`common.drift`); tests/test_workers.py runs it on a real nightly."""

from __future__ import annotations

import statistics

import pytest

from common.db import Job, ModelVersion, Product, record_results, session_scope
from common.drift import drift_level, drift_warning
from common.migrate import upgrade
from workers.job_state import record_drift


def test_drift_level_measures_the_way_from_the_nominal_median_to_the_threshold() -> None:
    assert drift_level(3.0, 2.0, 4.0) == 0.5  # halfway from 2 to 4
    assert drift_level(4.0, 2.0, 4.0) == 1.0  # the typical image sits on the threshold
    assert drift_level(1.0, 2.0, 4.0) == -0.5  # a run calmer than the held-out images
    assert drift_level(3.0, 4.0, 4.0) is None  # no span: no reference


@pytest.mark.parametrize(("run_median", "limit", "expected"), [
    (2.9, 0.5, None),  # 45 %: below the limit
    (3.2, 0.5, "60% of the way"),
    (3.0, 0.5, "50% of the way"),  # the limit itself warns
    (3.2, 0.0, None),  # check off
    (5.0, 0.8, "150% of the way"),
])
def test_drift_warning(run_median: float, limit: float, expected: str | None) -> None:
    warning = drift_warning(run_median, 2.0, 4.0, limit)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and expected in warning and "refit" in warning


def test_no_warning_without_a_reference() -> None:
    assert drift_warning(9.0, None, 4.0, 0.5) is None  # a model version fitted before the check existed
    assert drift_warning(None, 2.0, 4.0, 0.5) is None  # nothing scored
    assert drift_warning(9.0, 2.0, None, 0.5) is None


def test_a_runs_median_is_the_same_kind_of_median_as_the_nominal_one(sqlite_url: str) -> None:
    """The reference (`nominal_median_score`) is `statistics.median`: for an even number of images, the
    mean of the two middle scores; the run's median, compared with it, must be the same."""
    upgrade(sqlite_url)
    with session_scope(sqlite_url) as session:
        product = Product(name="p", train_uri="t/", archive_uri_template="a/{date}/")
        session.add(product)
        session.flush()
        version = ModelVersion(product_id=product.id, version=1, status="ready")
        session.add(version)
        session.flush()
        for scores in ([4.0, 1.0, 3.0, 2.0], [3.0, 1.0, 2.0]):
            job = Job(kind="score", product_id=product.id, model_version_id=version.id, done=len(scores))
            session.add(job)
            session.flush()
            record_results(session, [{"job_id": job.id, "model_version_id": version.id, "product_id": product.id,
                                      "image_uri": f"s3://b/{job.id}/{i}.png", "status": "ok", "score": score}
                                     for i, score in enumerate(scores)])
            record_drift(session, job)
            assert job.median_score == statistics.median(scores), scores
