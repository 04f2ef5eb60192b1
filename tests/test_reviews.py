"""`totalrecall review`: an inspector's verdicts on scored images, shown in `anomaly_history`; images
reviewed good learned by the product's next fit (a false alarm that stops recurring); images reviewed
defective guarding each fit's activation.

In-process on the embedded default (SQLite, local folder, tasks run eagerly): the CLI's own `main`, real
fits and real score jobs. The tests share one product and add versions to it; each also passes alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, insert, select

from common.db import Job, ModelVersion, Product, Result, Review, anomaly_history, get_engine, session_scope
from common.storage import Storage
from common.synthetic import nominal_image, plant_defect, png_bytes
from tests.conftest import SMALL_FIT, embedded_with_training_images
from totalrecall.cli import main

SIZE = 96
NAME = "cover"


def with_plate(image: np.ndarray) -> np.ndarray:
    """A good part of a new kind: an engraved plate (fine stripes) in its top-left corner, which no
    training image shows."""
    out = image.copy()
    stripes = np.where(np.arange(28) % 4 < 2, 70, 190).astype(np.uint8)
    out[6:34, 6:34] = stripes[None, :, None]
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """Product `cover` fitted once (v1), and one score job over `night/`: four parts with the new plate,
    two of them also without it, one with a scratch, one plain."""
    with embedded_with_training_images(tmp_path_factory.mktemp("home"), f"train/{NAME}", 12) as storage:
        assert main(["product", "add", NAME, "--train", storage.uri_for(f"train/{NAME}"),
                     "--archive", storage.uri_for(f"archive/{{date}}/{NAME}"), *SMALL_FIT]) == 0
        assert main(["fit", NAME, "--wait"]) == 0
        for name, image in _night().items():
            storage.put_bytes(f"night/{name}.png", png_bytes(image))
        assert main(["score", NAME, "--images", storage.uri_for("night"), "--wait"]) == 0
        yield storage


UNSEEN = (206, 207)  # parts scored with and without the plate, never reviewed


def _night() -> dict[str, np.ndarray]:
    scratched, _ = plant_defect(nominal_image(203, SIZE), 3, kind="scratch", center=(60, 60))
    night = {"plate_a": with_plate(nominal_image(200, SIZE)), "plate_b": with_plate(nominal_image(201, SIZE)),
             "scratch": scratched, "plain": nominal_image(204, SIZE)}
    for seed in UNSEEN:
        night[f"plain_{seed}"] = nominal_image(seed, SIZE)
        night[f"plate_{seed}"] = with_plate(night[f"plain_{seed}"])
    return night


def _results(version: int) -> dict[str, Result]:
    """image name -> result under the given model version."""
    with session_scope() as session:
        rows = session.scalars(select(Result).join(ModelVersion).join(Product, Product.id == ModelVersion.product_id)
                               .where(Product.name == NAME, ModelVersion.version == version)).all()
    return {r.image_uri.rsplit("/", 1)[1].removesuffix(".png"): r for r in rows}


def _version(version: int) -> ModelVersion:
    with session_scope() as session:
        return session.scalars(select(ModelVersion).join(Product).where(
            Product.name == NAME, ModelVersion.version == version)).one()


def test_reviews_refuse_what_was_not_scored_and_record_nothing(store: Storage, capsys) -> None:
    plate_a = store.uri_for("night/plate_a.png")
    assert main(["review", "mark", NAME, plate_a, store.uri_for("night/never-scored.png"), "--good"]) == 2
    assert "only scored images can be reviewed" in capsys.readouterr().err
    assert main(["review", "mark", "nope", plate_a, "--good"]) == 2
    assert "unknown product 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a verdict is required, and only one
        main(["review", "mark", NAME, plate_a])
    assert main(["review", "mark", NAME, plate_a, "--good", "--type", "scratch"]) == 2
    assert "a defect type goes with a 'defective' verdict only" in capsys.readouterr().err
    with session_scope() as session:
        assert session.scalars(select(Review)).all() == []  # all or nothing: plate_a was not recorded


def test_a_bulk_review_of_more_images_than_one_statement_can_bind(store: Storage, capsys) -> None:
    """An inspector's whole backlog in one call: 40,000 scored images of another product are marked,
    re-marked and cleared, on a SQLite that binds at most 32,766 parameters a statement (its default
    build; Debian's allows 250,000), which one IN list of them would exceed."""
    engine = get_engine()
    event.listen(engine, "connect", _default_sqlite_variable_limit)
    engine.dispose()  # new connections, with the limit
    try:
        _bulk_review(store, capsys, 40_000)
    finally:
        event.remove(engine, "connect", _default_sqlite_variable_limit)
        engine.dispose()


def _default_sqlite_variable_limit(dbapi_connection, _record) -> None:
    dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766)


def _bulk_review(store: Storage, capsys, n: int) -> None:
    uris = [store.uri_for(f"bulk/{i:05d}.png") for i in range(n)]
    with session_scope() as session:
        product = Product(name="bulk", train_uri=store.uri_for("train"), archive_uri_template="x/{date}")
        session.add(product)
        session.flush()
        version = ModelVersion(product_id=product.id, version=1, status="ready")
        session.add(version)
        session.flush()
        job = Job(kind="score", product_id=product.id, model_version_id=version.id, status="succeeded", total=n)
        session.add(job)
        session.flush()
        session.execute(insert(Result), [
            {"job_id": job.id, "model_version_id": version.id, "product_id": product.id, "image_uri": u,
             "status": "ok", "score": 1.0, "threshold": 2.0, "is_anomalous": False} for u in uris])
    assert main(["review", "mark", "bulk", *uris, "--good"]) == 0
    assert main(["review", "mark", "bulk", *uris[:3], "--defective"]) == 0
    assert "(3 had another verdict)" in capsys.readouterr().out
    with session_scope() as session:
        labels = dict(session.execute(select(Review.image_uri, Review.label).join(Product).where(
            Product.name == "bulk")).all())
    assert len(labels) == n and [labels[u] for u in uris[:4]] == ["defective"] * 3 + ["good"]
    assert main(["review", "clear", "bulk", *uris]) == 0
    assert f"{n} review(s)" in capsys.readouterr().out
    with session_scope() as session:
        assert session.scalars(select(Review).join(Product).where(Product.name == "bulk")).all() == []


def test_verdicts_show_in_the_history_and_can_be_changed_or_cleared(store: Storage, capsys) -> None:
    plain, scratch = store.uri_for("night/plain.png"), store.uri_for("night/scratch.png")
    assert main(["review", "mark", NAME, scratch, "--defective", "--type", "scratch", "--by", "ana"]) == 0
    assert main(["review", "mark", NAME, plain, "--defective"]) == 0
    assert main(["review", "mark", NAME, plain, "--good", "--note", "dust on the lens"]) == 0
    assert "(1 had another verdict)" in capsys.readouterr().out
    with get_engine().connect() as connection:
        history = {r.image_uri: (r.review, r.defect_type) for r in connection.execute(
            select(anomaly_history).where(anomaly_history.c.product == NAME))}
    assert history[scratch] == ("defective", "scratch") and history[plain] == ("good", None)
    assert history[store.uri_for("night/plate_a.png")] == (None, None)  # not reviewed
    assert main(["review", "list", NAME, "--label", "defective"]) == 0
    out = capsys.readouterr().out
    assert "ana" in out and scratch in out and plain not in out
    assert main(["review", "mark", NAME, scratch, "--defective", "--note", "two\nlines \x1b[31mred"]) == 0
    capsys.readouterr()
    assert main(["review", "list", NAME, "--label", "defective"]) == 0
    listed = capsys.readouterr().out
    assert "two\\nlines \\x1b[31mred" in listed and "\x1b" not in listed and len(listed.splitlines()) == 3
    assert main(["review", "clear", NAME, plain, scratch]) == 0
    assert "2 review(s)" in capsys.readouterr().out
    assert main(["review", "clear", NAME, plain]) == 0
    assert "0 review(s) of 'cover' removed (1 of the images given had none)" in capsys.readouterr().out
    assert main(["review", "mark", NAME, plain, "--good"]) == 0
    capsys.readouterr()
    twice = plain.replace("/night/", "/night/./")  # the same image, written another way
    assert main(["review", "clear", NAME, plain, twice]) == 0
    assert capsys.readouterr().out.strip() == "1 review(s) of 'cover' removed"  # not "(1 ... had none)"
    with pytest.raises(SystemExit):
        main(["review", "list", NAME, "--label", "bogus"])
    assert "(choose from 'good', 'defective')" in capsys.readouterr().err
    assert main(["review", "list", NAME]) == 0
    assert f"no reviews of {NAME!r}" in capsys.readouterr().out


def test_a_defect_type_or_reviewer_longer_than_its_column_is_refused(store: Storage, capsys) -> None:
    """PostgreSQL would refuse the row (SQLite stores it): refused up front, on either, nothing recorded."""
    def reviews() -> list[tuple[str, str]]:
        with session_scope() as session:
            return session.execute(select(Review.image_uri, Review.label).order_by(Review.id)).all()

    before, scratch = reviews(), store.uri_for("night/scratch.png")
    for option, what in (("--type", "defect type"), ("--by", "reviewer")):
        assert main(["review", "mark", NAME, scratch, "--defective", option, "x" * 201]) == 2
        assert f"the {what} is 201 characters long: at most 200" in capsys.readouterr().err
    assert reviews() == before


def test_a_false_alarm_reviewed_good_is_learned_by_the_next_fit(store: Storage) -> None:
    v1 = _results(1)
    plates = [name for name in v1 if name.startswith("plate_")]
    assert all(v1[name].is_anomalous for name in [*plates, "scratch"]), v1  # v1 flags the new plate

    assert main(["review", "mark", NAME, store.uri_for("night/plate_a.png"), store.uri_for("night/plate_b.png"),
                 "--good"]) == 0
    assert main(["fit", NAME, "--wait"]) == 0
    first, second = _version(1), _version(2)
    assert second.is_active and second.validation["reviewed_good_images"] == 2
    assert second.train_image_count == first.train_image_count + 2  # in the bank, never held out
    assert second.validation["holdout_images"] == first.validation["holdout_images"]
    with session_scope() as session:
        fits = session.scalars(select(Job).where(Job.kind == "fit").order_by(Job.id)).all()
        assert fits[-1].total == fits[0].total + 2  # the fit job counts the reviewed images

    assert main(["score", NAME, "--images", store.uri_for("night"), "--wait"]) == 0
    v2 = _results(2)
    assert not v2["plate_a"].is_anomalous and not v2["plate_b"].is_anomalous  # the reviewed false alarms
    assert v2["scratch"].is_anomalous  # a real defect still is one
    for seed in UNSEEN:  # the plate itself was learned, not two images: on parts never reviewed it adds
        plate, plain = f"plate_{seed}", f"plain_{seed}"  # almost nothing to the part's own score
        added_before = v1[plate].score - v1[plain].score
        added_after = v2[plate].score - v2[plain].score
        assert added_before > 100 and added_after < 0.05 * added_before, (seed, added_before, added_after)


def test_reviewed_images_gone_from_storage_are_recorded_failures_that_do_not_block_the_fit(
        store: Storage, capsys) -> None:
    """Archive retention took two images reviewed good before the fit: each is a failure of the fit, named
    with what to do, but they are not training images: the new version still becomes active (two of 12
    training images failing would have stopped it)."""
    reviewed = [store.uri_for("night/plain.png"), store.uri_for("night/plain_206.png")]
    assert main(["review", "mark", NAME, *reviewed, "--good"]) == 0
    for uri in reviewed:
        store.delete(uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[1])
    assert main(["fit", NAME, "--wait"]) == 0
    with session_scope() as session:
        version = session.scalars(select(ModelVersion).join(Product).where(Product.name == NAME)
                                  .order_by(ModelVersion.version.desc())).first()
        job = session.scalars(select(Job).where(Job.model_version_id == version.id)).one()
        stats, failed, job_id, active = version.validation, job.failed, job.id, version.is_active
        good = len(session.scalars(select(Review).join(Product).where(Product.name == NAME,
                                                                      Review.label == "good")).all())
    failures = {f["uri"]: f["error"] for f in stats["failed_images"]}
    assert sorted(failures) == sorted(reviewed) and failed == 2  # named, not skipped
    assert all("an image reviewed good" in error for error in failures.values())
    assert active and stats["activation"]["passed"], stats["activation"]
    assert stats["reviewed_good_failed"] == 2 and stats["reviewed_good_images"] == good - 2  # those read
    capsys.readouterr()
    assert main(["jobs", str(job_id)]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}: 2 failed image(s)" in out and f"  {reviewed[0]}: " in out
    assert main(["model", "list", NAME]) == 0
    assert f"{good - 2} reviewed good (2 unreadable)" in capsys.readouterr().out.splitlines()[2]


def _active() -> ModelVersion:
    with session_scope() as session:
        return session.scalars(select(ModelVersion).join(Product).where(Product.name == NAME,
                                                                        ModelVersion.is_active)).one()


def test_a_fit_that_misses_a_confirmed_defect_is_not_activated(store: Storage, capsys) -> None:
    scratch = store.uri_for("night/scratch.png")
    assert _results(1)["scratch"].is_anomalous  # flagged when last scored
    store.put_bytes("night3/twin.png", png_bytes(_night()["scratch"]))  # the same part, photographed again
    assert main(["score", NAME, "--images", store.uri_for("night3"), "--wait"]) == 0  # reviewable now
    before = _active()
    assert main(["review", "mark", NAME, scratch, "--defective", "--type", "scratch"]) == 0
    assert main(["review", "mark", NAME, store.uri_for("night3/twin.png"), "--good"]) == 0  # a wrong review

    capsys.readouterr()
    assert main(["fit", NAME, "--wait"]) == 0  # the fit succeeds; its version is ready, not active
    out = capsys.readouterr().out
    assert "is ready but not active: misses 1 confirmed defect(s)" in out
    with session_scope() as session:
        newest = session.scalars(select(ModelVersion).join(Product).where(Product.name == NAME)
                                 .order_by(ModelVersion.version.desc())).first()
        checked, activation = newest.validation["confirmed_defects"], newest.validation["activation"]
    assert checked["missed"] == [scratch] and checked["images"] == 1 and checked["flagged"] == 0
    assert not activation["passed"] and scratch in activation["reason"]
    assert _active().version == before.version  # the active version stays

    assert main(["review", "mark", NAME, store.uri_for("night3/twin.png"), "--defective"]) == 0  # corrected
    assert main(["fit", NAME, "--wait"]) == 0
    corrected = _active()
    assert corrected.version == newest.version + 1
    assert corrected.validation["confirmed_defects"] == {"images": 2, "flagged": 2, "failed": [], "missed": [],
                                                         "unverified": []}
    capsys.readouterr()
    assert main(["model", "list", NAME]) == 0  # what shaped each version, newest first
    rows = capsys.readouterr().out.splitlines()[2:]
    unreadable = newest.validation["reviewed_good_failed"]  # images an earlier test deleted, if it ran
    assert f"{newest.validation['reviewed_good_images']} reviewed good" + \
        (f" ({unreadable} unreadable)" if unreadable else "") + ", flags 0/1 confirmed defects" in rows[1]
    assert rows[0].startswith(f"v{corrected.version} ") and "flags 2/2 confirmed defects" in rows[0]
    assert corrected.validation["reviewed_good_images"] == newest.validation["reviewed_good_images"] - 1


def test_a_confirmed_defect_that_can_no_longer_be_read_keeps_the_next_version_inactive(store: Storage,
                                                                                     capsys) -> None:
    """The regression check cannot vouch for a confirmed defect it cannot score: the version is ready,
    not active, and says which image and what to do; `model list` counts it unreadable."""
    dent = store.put_bytes("night4/dent.png", png_bytes(_night()["scratch"]))
    assert main(["score", NAME, "--images", store.uri_for("night4"), "--wait"]) == 0
    before = _active()
    assert _results(before.version)["dent"].is_anomalous  # flagged when last scored
    assert main(["review", "mark", NAME, dent, "--defective"]) == 0
    store.put_bytes("night4/dent.png", b"overwritten by a broken camera export")
    capsys.readouterr()
    assert main(["fit", NAME, "--wait"]) == 0
    assert "is ready but not active: cannot score 1 confirmed defect(s)" in capsys.readouterr().out
    assert _active().version == before.version
    with session_scope() as session:
        newest = session.scalars(select(ModelVersion).join(Product).where(Product.name == NAME)
                                 .order_by(ModelVersion.version.desc())).first()
        checked, reason = newest.validation["confirmed_defects"], newest.validation["activation"]["reason"]
    assert checked["unverified"] == [dent] and [f["uri"] for f in checked["failed"]] == [dent]
    assert f"e.g. {dent}: the regression check needs them" in reason and "review clear" in reason
    assert main(["model", "list", NAME]) == 0
    assert "confirmed defects (1 unreadable)" in capsys.readouterr().out.splitlines()[2]


def test_reviews_outrank_the_training_folder(tmp_path: Path) -> None:
    """A training folder holding a part reviewed defective (a contaminated training set, found by scoring
    it) and one reviewed good: the next fit leaves the first out of its bank and puts the second in it,
    never among the held-out images, as for reviewed images elsewhere."""
    with embedded_with_training_images(tmp_path, "train", 12) as storage:
        scratched, _ = plant_defect(nominal_image(500, SIZE), 5, kind="scratch", center=(48, 48))
        storage.put_bytes("train/zz_scratched.png", png_bytes(scratched))
        assert main(["product", "add", "mixed", "--train", storage.uri_for("train"),
                     "--archive", storage.uri_for("archive/{date}/mixed"), *SMALL_FIT]) == 0
        assert main(["fit", "mixed", "--wait"]) == 0
        assert main(["score", "mixed", "--images", storage.uri_for("train"), "--wait"]) == 0
        assert main(["review", "mark", "mixed", storage.uri_for("train/zz_scratched.png"), "--defective"]) == 0
        assert main(["review", "mark", "mixed", storage.uri_for("train/n02.png"), "--good"]) == 0
        assert main(["fit", "mixed", "--wait"]) == 0
        with session_scope() as session:
            first, second = session.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
            stats = second.validation
            assert stats["confirmed_defects"]["flagged"] == 1  # out of the bank, the scratch is found
            assert stats["reviewed_good_images"] == 1  # in the bank, not in the holdout split
            assert stats["reviewed_defective_left_out"] == 1
            assert second.train_image_count == first.train_image_count - 1
            assert stats["holdout_images"] == first.validation["holdout_images"]  # from the 11 others
