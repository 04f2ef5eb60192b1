"""`totalrecall product set` and `totalrecall model list|activate`: change a product's fit settings for its
next fit, see its model versions, and roll back to an earlier one.

In-process on the embedded default (SQLite, local folder, tasks run eagerly): the CLI's own `main`, real
fits and a real score job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from common.db import Job, ModelVersion, Product, Result, session_scope
from common.logs import parse_fields
from common.storage import Storage
from common.synthetic import nominal_image, png_bytes
from scheduler.jobs import new_fit_job
from tests.conftest import SMALL_FIT, embedded_with_training_images
from totalrecall.cli import main
from workers.fitting import fit_job, start_fit

SIZE = 96
NAME = "part"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """An embedded home with product `part` registered and fitted once (v1 active)."""
    with embedded_with_training_images(tmp_path_factory.mktemp("home"), f"train/{NAME}", 12) as storage:
        assert main(["product", "add", NAME, "--train", storage.uri_for(f"train/{NAME}"),
                     "--archive", storage.uri_for(f"archive/{{date}}/{NAME}"), *SMALL_FIT]) == 0
        assert main(["fit", NAME, "--wait"]) == 0
        yield storage


def _product() -> Product:
    with session_scope() as session:
        return session.scalars(select(Product).where(Product.name == NAME)).one()


def _versions() -> dict[int, ModelVersion]:
    with session_scope() as session:
        return {v.version: v for v in session.scalars(select(ModelVersion).join(Product)
                                                      .where(Product.name == NAME))}


def test_set_changes_only_the_given_settings_for_the_next_fit(store: Storage, capsys) -> None:
    before = _product().fit_config
    assert main(["product", "set", NAME, "--coreset-ratio", "0.2", "--layers", "blocks.3,blocks.4"]) == 0
    out = capsys.readouterr().out
    assert "coreset_ratio 0.1 -> 0.2" in out and "layers None -> ['blocks.3', 'blocks.4']" in out
    after = _product().fit_config
    assert after["coreset_ratio"] == 0.2 and after["layers"] == ["blocks.3", "blocks.4"]
    assert {k: v for k, v in after.items() if k not in ("coreset_ratio", "layers")} == \
        {k: v for k, v in before.items() if k not in ("coreset_ratio", "layers")}  # image_size 96 kept

    assert main(["fit", NAME, "--wait"]) == 0
    versions = _versions()
    assert versions[2].config["layers"] == ["blocks.3", "blocks.4"] and versions[2].config["coreset_ratio"] == 0.2
    assert versions[1].config["layers"] is None and versions[1].config["coreset_ratio"] == 0.1  # kept its own
    assert versions[2].is_active and not versions[1].is_active

    assert main(["product", "set", NAME, "--coreset-ratio", "0.2"]) == 0
    assert "nothing changed" in capsys.readouterr().out

    assert main(["product", "set", NAME, "--resize", "square", "--center-crop", "64"]) == 0
    assert (_product().fit_config["resize"], _product().fit_config["center_crop"]) == ("square", 64)
    assert main(["product", "set", NAME, "--center-crop", "0", "--resize", "auto"]) == 0  # the crop taken away
    assert "center_crop 64 -> None" in capsys.readouterr().out
    assert (_product().fit_config["resize"], _product().fit_config["center_crop"]) == ("auto", None)


@pytest.mark.parametrize(("args", "message"), [
    (["--coreset-ratio", "2"], "coreset_ratio must be in (0, 1]"),
    (["--archive", "/somewhere/without/date"], "must contain {date}"),
    (["--weights", "w.pth"], "--weights is not stored"),
])
def test_set_refuses_an_invalid_change_and_keeps_the_product(store: Storage, capsys, args: list[str],
                                                             message: str) -> None:
    before = _product()
    assert main(["product", "set", NAME, "--image-size", "128", *args]) == 2
    assert message in capsys.readouterr().err
    after = _product()
    assert (after.fit_config, after.archive_uri_template) == (before.fit_config, before.archive_uri_template)


def test_roll_back_to_an_earlier_version_and_score_with_it(store: Storage, capsys, caplog) -> None:
    if 2 not in _versions():
        assert main(["fit", NAME, "--wait"]) == 0  # this test alone: a second version to roll back from
    newest = max(_versions())
    capsys.readouterr()
    assert main(["model", "list", NAME]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == [f"v{n}" for n in range(newest, 0, -1)]  # newest first
    assert rows[0][1] == "*" and "*" not in [r[1] for r in rows[1:]]  # the newest one is active

    with caplog.at_level(logging.INFO, logger="scheduler.versions"):
        assert main(["model", "activate", NAME, "1"]) == 0
    assert f"is now active (was version {newest})" in capsys.readouterr().out
    event = [parse_fields(r.getMessage()) for r in caplog.records if "model_activated" in r.getMessage()]
    assert event and event[0]["version"] == "1" and event[0]["previous"] == str(newest)
    versions = _versions()
    assert versions[1].is_active and not versions[newest].is_active

    for i in range(2):
        store.put_bytes(f"adhoc/img{i}.png", png_bytes(nominal_image(100 + i, SIZE)))
    assert main(["score", NAME, "--images", store.uri_for("adhoc"), "--wait"]) == 0
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.kind == "score").order_by(Job.id.desc())).first()
        results = session.scalars(select(Result).where(Result.job_id == job.id)).all()
        assert job.model_version_id == versions[1].id and len(results) == 2
        assert {r.model_version_id for r in results} == {versions[1].id}

    assert main(["model", "activate", NAME, "1"]) == 0
    assert "already the active one" in capsys.readouterr().out


def test_activate_refuses_what_cannot_be_active(store: Storage, capsys) -> None:
    with session_scope() as session:  # a fit that failed: its version is failed, never active
        version = session.scalars(select(ModelVersion).join(Product).where(Product.name == NAME)
                                  .order_by(ModelVersion.version.desc())).first()
        failed = ModelVersion(product_id=version.product_id, version=version.version + 1, status="failed",
                              error="no training images under ...")
        session.add(failed)
    active = [v for v in _versions().values() if v.is_active]
    assert main(["model", "activate", NAME, str(failed.version)]) == 2
    assert "is failed (no training images under ...); only a ready version can be active" in capsys.readouterr().err
    assert main(["model", "activate", NAME, "99"]) == 2
    assert "has no model version 99" in capsys.readouterr().err
    assert main(["model", "activate", "nope", "1"]) == 2
    assert "unknown product 'nope'" in capsys.readouterr().err
    assert [v.id for v in _versions().values() if v.is_active] == [v.id for v in active]  # unchanged
    assert main(["model", "list", NAME]) == 0
    assert f"v{failed.version}" in capsys.readouterr().out


def test_deactivate_pauses_the_nightly_until_a_version_is_activated(store: Storage, capsys) -> None:
    active = next(v.version for v in _versions().values() if v.is_active)
    assert main(["model", "deactivate", NAME]) == 0
    assert f"has no active model now (was version {active})" in capsys.readouterr().out
    assert not any(v.is_active for v in _versions().values())
    assert main(["nightly", "--date", "2026-11-30"]) == 0
    assert f"{NAME}: skipped, no active model" in capsys.readouterr().out
    assert main(["score", NAME, "--images", store.uri_for("adhoc")]) == 2
    assert "has no active model" in capsys.readouterr().err
    assert main(["model", "activate", NAME, str(active)]) == 0
    assert main(["nightly", "--date", "2026-11-30"]) == 0
    assert f"{NAME}: job " in capsys.readouterr().out


def test_an_older_fit_finishing_last_leaves_the_newer_version_active(store: Storage, capsys) -> None:
    """Two fits of the product overlap, and the one started first (older settings) finishes last: its
    version passes the activation rule but stays inactive, saying why; the newer one stays active."""
    with session_scope() as session:
        job = new_fit_job(_product(), "test")
        session.add(job)
    older = start_fit(job.id)  # a worker starts it: its version number is taken
    assert main(["fit", NAME, "--wait"]) == 0  # a fit started later finishes first
    newer = max(_versions())
    outcome = fit_job(job.id)  # the first worker finishes now
    assert outcome is not None and not outcome.activated
    versions = _versions()
    assert versions[newer].is_active and versions[older.version].status == "ready"
    assert not versions[older.version].is_active and versions[older.version].validation["activation"]["passed"]
    with session_scope() as session:
        error = session.get(Job, job.id).error
    assert f"model version {older.version} is ready but not active: version {newer}, from a fit started " \
        f"later, is active already (`totalrecall model activate {NAME} {older.version}`" in error
    capsys.readouterr()
    assert main(["model", "list", NAME]) == 0
    assert f"not activated: v{newer} (fitted later) was active first" in capsys.readouterr().out


def test_an_older_fit_finishing_last_is_activated_when_the_newer_version_is_not_active(store: Storage) -> None:
    """The fit started later finished first but its version is not active (deactivated here; or it missed
    its activation rule): the older fit's passing version becomes the active one."""
    with session_scope() as session:
        job = new_fit_job(_product(), "test")
        session.add(job)
    older = start_fit(job.id)
    assert main(["fit", NAME, "--wait"]) == 0
    assert main(["model", "deactivate", NAME]) == 0
    outcome = fit_job(job.id)
    assert outcome is not None and outcome.activated
    assert _versions()[older.version].is_active
