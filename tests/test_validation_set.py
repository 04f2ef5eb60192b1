"""A product's labelled validation images: each fit sets F1-optimal thresholds from them.

In-process on the embedded default (SQLite, local folder, tasks run eagerly): the CLI's own `main`, real
fits and a real score job.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from common.db import Job, ModelVersion, Product, Result, session_scope
from common.engine.artifact import META_FILE
from common.engine.mvtec import read_mask
from common.settings import reset_settings_cache
from common.storage import Storage, read_uri
from common.synthetic import mask_png_bytes, nominal_image, plant_defect, png_bytes
from tests.conftest import SMALL_FIT, embedded_with_training_images, without_root_powers
from totalrecall.cli import main
from workers import validation

SIZE = 96  # as SMALL_FIT


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """An embedded home with 12 training images, and a validation folder: 4 good, 4 scratched (3 masks)."""
    with embedded_with_training_images(tmp_path_factory.mktemp("home"), "train", 12) as storage:
        for i in range(4):
            storage.put_bytes(f"validation/good/g{i}.png", png_bytes(nominal_image(100 + i, SIZE)))
            image, mask = plant_defect(nominal_image(200 + i, SIZE), i, kind="scratch")
            storage.put_bytes(f"validation/scratch/d{i}.png", png_bytes(image))
            if i:  # d0 has no mask
                storage.put_bytes(f"validation/ground_truth/scratch/d{i}_mask.png", mask_png_bytes(mask))
        yield storage


def _add(store: Storage, name: str, *options: str) -> None:
    assert main(["product", "add", name, "--train", store.uri_for("train"),
                 "--archive", store.uri_for(f"archive/{{date}}/{name}"), *SMALL_FIT, *options]) == 0


def _latest(name: str) -> tuple[ModelVersion, Job]:
    with session_scope() as session:
        version = session.scalars(select(ModelVersion).join(Product).where(Product.name == name)
                                  .order_by(ModelVersion.version.desc())).first()
        job = session.scalars(select(Job).where(Job.model_version_id == version.id)).one()
        return version, job


def test_fit_sets_f1_thresholds_that_separate_the_validation_images(store: Storage, capsys) -> None:
    _add(store, "plain")
    _add(store, "checked", "--validation", store.uri_for("validation"))
    for name in ("plain", "checked"):
        assert main(["fit", name, "--wait"]) == 0
    plain, _ = _latest("plain")
    checked, _ = _latest("checked")
    summary = checked.validation["validation_set"]
    assert (summary["nominal"], summary["defective"], summary["defective_with_mask"]) == (4, 4, 3)
    assert summary["failed_images"] == [] and summary["unreadable_masks"] == []
    assert checked.validation["calibration"] == ("labelled validation images: image threshold F1-optimal, "
                                                 "pixel threshold F1-optimal")
    assert "validation_set" not in plain.validation and plain.validation["calibration"].startswith("max(")
    # the same training images and seed: the same bank, other thresholds
    assert checked.config == plain.config and checked.image_threshold != plain.image_threshold
    assert checked.pixel_threshold != plain.pixel_threshold
    meta = json.loads((Path(checked.artifact_uri) / META_FILE).read_text())  # the artifact carries them
    assert (meta["image_threshold"], meta["pixel_threshold"]) == (checked.image_threshold, checked.pixel_threshold)

    assert main(["score", "checked", "--images", store.uri_for("validation"), "--wait"]) == 0
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.kind == "score").order_by(Job.id.desc())).first()
        rows = session.scalars(select(Result).where(Result.job_id == job.id)).all()
    verdicts = {f"{Path(r.image_uri).parent.name}/{Path(r.image_uri).name}": r.is_anomalous for r in rows
                if "ground_truth" not in r.image_uri}  # the folder's masks were scored too, as images
    assert verdicts == {**{f"good/g{i}.png": False for i in range(4)}, **{f"scratch/d{i}.png": True for i in range(4)}}

    capsys.readouterr()
    assert main(["model", "list", "checked"]) == 0
    assert "F1 (4+4)" in capsys.readouterr().out


@pytest.mark.parametrize(("layout", "message"), [
    ({"good/a.png": True}, "needs nominal images in good/ and defective ones in defect-type folders: found 1 and 0"),
    ({"good/a.png": True, "crack/b.png": False, "loose.png": True}, "validation images must be in good/ or a "
     "defect-type folder"),
])
def test_a_validation_folder_that_cannot_be_used_fails_the_fit_saying_why(store: Storage, layout: dict,
                                                                          message: str, capsys) -> None:
    name = f"bad{len(layout)}"
    for key, nominal in layout.items():
        image = nominal_image(300, SIZE) if nominal else plant_defect(nominal_image(301, SIZE), 1)[0]
        store.put_bytes(f"{name}-validation/{key}", png_bytes(image))
    _add(store, name, "--validation", store.uri_for(f"{name}-validation"))
    assert main(["fit", name, "--wait"]) != 0
    version, job = _latest(name)
    assert job.status == "failed" and message in job.error
    assert version.status == "failed" and not version.is_active


def test_a_missing_validation_folder_fails_the_fit_and_is_not_created(store: Storage) -> None:
    missing = Path(store.uri_for("train")).parent / "no-such-folder"
    _add(store, "missing", "--validation", str(missing))
    assert main(["fit", "missing", "--wait"]) != 0
    version, job = _latest("missing")
    assert job.status == "failed" and f"no images under the validation folder {missing}" in job.error
    assert not missing.exists()


def test_product_set_adds_and_removes_the_validation_folder(store: Storage, capsys) -> None:
    _add(store, "later")
    assert main(["product", "set", "later", "--validation", store.uri_for("validation")]) == 0
    assert "validation None -> " in capsys.readouterr().out
    assert main(["fit", "later", "--wait"]) == 0
    assert _latest("later")[0].validation["validation_set"]["defective"] == 4
    capsys.readouterr()
    assert main(["product", "list"]) == 0
    assert store.uri_for("validation") in next(line for line in capsys.readouterr().out.splitlines()
                                                if line.startswith("later "))
    assert main(["product", "set", "later", "--validation", ""]) == 0
    assert main(["fit", "later", "--wait"]) == 0
    assert "validation_set" not in _latest("later")[0].validation


def test_an_unreadable_mask_is_left_out_and_named(store: Storage) -> None:
    for i in range(2):
        store.put_bytes(f"torn/good/g{i}.png", png_bytes(nominal_image(400 + i, SIZE)))
        image, mask = plant_defect(nominal_image(500 + i, SIZE), i, kind="scratch")
        store.put_bytes(f"torn/crack/d{i}.png", png_bytes(image))
        store.put_bytes(f"torn/ground_truth/crack/d{i}_mask.png", mask_png_bytes(mask)[: 40 if i else None])
    _add(store, "torn", "--validation", store.uri_for("torn"))
    assert main(["fit", "torn", "--wait"]) == 0
    version, job = _latest("torn")
    summary = version.validation["validation_set"]
    assert job.status == "succeeded" and version.is_active
    assert (summary["defective"], summary["defective_with_mask"]) == (2, 1)
    assert [m["mask"] for m in summary["unreadable_masks"]] == [store.uri_for("torn/ground_truth/crack/d1_mask.png")]


def test_a_mask_over_the_pixel_limit_is_left_out_and_named(store: Storage, monkeypatch) -> None:
    """Pillow refuses a mask above twice TOTALRECALL_MAX_IMAGE_PIXELS (DecompressionBombError, no OSError):
    the mask is left out like any unreadable one, instead of failing the fit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # decoding sets it: restored after
    monkeypatch.setenv("TOTALRECALL_MAX_IMAGE_PIXELS", str(2 * SIZE * SIZE))
    reset_settings_cache()
    for key in ("good/g0.png", "good/g1.png", "scratch/d1.png", "scratch/d2.png", "ground_truth/scratch/d1_mask.png"):
        store.put_bytes(f"huge/{key}", store.get_bytes(f"validation/{key}"))
    mask = read_mask(store.get_bytes("validation/ground_truth/scratch/d2_mask.png"))
    store.put_bytes("huge/ground_truth/scratch/d2_mask.png", mask_png_bytes(np.kron(mask, np.ones((3, 3), bool))))
    _add(store, "huge", "--validation", store.uri_for("huge"))
    assert main(["fit", "huge", "--wait"]) == 0
    summary = _latest("huge")[0].validation["validation_set"]
    assert (summary["defective"], summary["defective_with_mask"]) == (2, 1)
    [unreadable] = summary["unreadable_masks"]
    assert unreadable["mask"] == store.uri_for("huge/ground_truth/scratch/d2_mask.png")
    assert unreadable["error"].startswith("DecompressionBombError")


@pytest.mark.parametrize("fault", [RuntimeError("plugin failed"), struct.error("unpack requires a buffer")])
def test_a_mask_a_decoder_plugin_fails_on_is_left_out(tmp_path: Path, monkeypatch, fault: Exception) -> None:
    """What `common.images` counts as a decoder's failure on a malformed file leaves that mask out."""
    def failing(data: bytes) -> None:
        raise fault

    (tmp_path / "m_mask.png").write_bytes(b"malformed")
    monkeypatch.setattr(validation, "read_mask", failing)
    masks = validation._Masks([str(tmp_path / "m_mask.png"), None], 1 << 20)
    assert masks[0] is None and masks[1] is None
    assert masks.unreadable == [{"mask": str(tmp_path / "m_mask.png"), "error": f"{type(fault).__name__}: {fault}"}]


def test_masks_are_found_with_any_image_suffix_in_any_case(tmp_path: Path) -> None:
    """`d0_mask.PNG` or `d1_mask.tif` is the mask of its image (only `_mask.png` was looked for)."""
    for key in ("good/g.png", "crack/d0.png", "crack/d1.JPG", "crack/d2.png", "ground_truth/crack/d0_mask.PNG",
                "ground_truth/crack/d1_mask.tif", "ground_truth/crack/d2_mask.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"")
    found = validation.list_validation_set(str(tmp_path))
    masks = {Path(image).name: mask and Path(mask).name for image, mask in zip(found.images, found.masks, strict=True)}
    assert masks == {"g.png": None, "d0.png": "d0_mask.PNG", "d1.JPG": "d1_mask.tif", "d2.png": "d2_mask.png"}


def test_validation_names_that_are_not_utf8_are_listed_as_storable_text(tmp_path: Path) -> None:
    """As for scored images: the URIs go into the version's JSON (failed images, unreadable masks), which
    PostgreSQL refuses with lone surrogates in it."""
    raw = os.fsencode(tmp_path)
    for key in (b"good/g.png", b"crack/d\xfc.png", b"ground_truth/crack/d\xfc_mask.png"):
        path = Path(os.fsdecode(raw + b"/" + key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key)
    found = validation.list_validation_set(str(tmp_path))
    assert found.images == [f"{tmp_path}/crack/d\\xfc.png", f"{tmp_path}/good/g.png"]
    assert found.masks == [f"{tmp_path}/ground_truth/crack/d\\xfc_mask.png", None]
    assert read_uri(found.masks[0]) == b"ground_truth/crack/d\xfc_mask.png"  # the text leads to the file


def test_an_unreadable_folder_in_the_validation_set_fails_the_listing(tmp_path: Path) -> None:
    """Its images would have been left out of the thresholds without a word."""
    for key in ("good/g.png", "crack/d0.png", "scratch/d1.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"")
    (tmp_path / "scratch").chmod(0)
    try:
        run = subprocess.run([*without_root_powers(), sys.executable, "-c",
                              f"from workers import validation; validation.list_validation_set({str(tmp_path)!r})"],
                             capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "scratch").chmod(0o755)
    assert run.returncode == 1
    assert f"ValidationSetError: cannot read scratch under the validation folder {tmp_path}" in run.stderr, run.stderr
    assert len(validation.list_validation_set(str(tmp_path)).images) == 3  # readable again: all listed


def test_a_false_alarm_budget_sets_the_image_threshold_from_the_nominal_images(store: Storage, capsys) -> None:
    assert main(["product", "add", "budget", "--train", store.uri_for("train"), "--archive",
                 store.uri_for("archive/{date}/budget"), "--max-false-alarms", "0"]) == 2
    assert "give both" in capsys.readouterr().err
    _add(store, "budget", "--validation", store.uri_for("validation"), "--max-false-alarms", "0")
    assert main(["fit", "budget", "--wait"]) == 0
    version, _ = _latest("budget")
    assert version.validation["validation_set"]["max_false_alarms"] == 0.0
    assert "at most 0.0% false alarms on 7 nominal images" in version.validation["calibration"]  # 4 + 3 held out
    assert version.image_threshold > max(version.validation["holdout_scores"])
    assert main(["score", "budget", "--images", store.uri_for("validation/good"), "--wait"]) == 0
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.kind == "score").order_by(Job.id.desc())).first()
        rows = session.scalars(select(Result).where(Result.job_id == job.id)).all()
    assert len(rows) == 4 and not any(r.is_anomalous for r in rows)
    assert max(r.score for r in rows) < version.image_threshold
    capsys.readouterr()
    assert main(["model", "list", "budget"]) == 0
    assert "<= 0.0% FA (4+4)" in capsys.readouterr().out

    assert main(["product", "set", "budget", "--max-false-alarms", "none"]) == 0
    assert "max_false_alarms 0.0 -> None" in capsys.readouterr().out
    assert main(["product", "set", "budget", "--max-false-alarms", "1.5"]) == 2
    assert "a fraction in [0, 1)" in capsys.readouterr().err


def test_an_unreadable_validation_image_is_named_and_the_others_still_calibrate(store: Storage) -> None:
    for key in ("good/g0.png", "good/g1.png", "scratch/d1.png"):
        store.put_bytes(f"partly-broken/{key}", store.get_bytes(f"validation/{key}"))
    store.put_bytes("partly-broken/ground_truth/scratch/d1_mask.png",
                    store.get_bytes("validation/ground_truth/scratch/d1_mask.png"))
    store.put_bytes("partly-broken/good/torn.png", b"\x89PNG\r\n\x1a\n truncated")
    _add(store, "partly", "--validation", store.uri_for("partly-broken"))
    assert main(["fit", "partly", "--wait"]) == 0
    summary = _latest("partly")[0].validation["validation_set"]
    assert [f["uri"] for f in summary["failed_images"]] == [store.uri_for("partly-broken/good/torn.png")]
    assert "corrupt or truncated image" in summary["failed_images"][0]["error"]
    assert (summary["nominal"], summary["defective"]) == (2, 1)  # scored; the unreadable one is listed above


def test_a_training_image_that_is_also_a_validation_image_fails_the_fit(store: Storage) -> None:
    """A link in the training folder that leads into the validation folder, and the folders of a product
    stored nested before `product add` refused that: the validation images would enter the memory bank."""
    import shutil

    root = Path(store.uri_for("train")).parent
    linked, nested = root / "train-linked", root / "train-nested"
    shutil.copytree(root / "train", linked)
    (linked / "more").symlink_to(root / "validation" / "scratch")
    shutil.copytree(root / "train", nested)
    shutil.copytree(root / "validation", nested / "validation")
    archive = store.uri_for("archive/{date}/x")
    assert main(["product", "add", "linked", "--train", str(linked), "--archive", archive, *SMALL_FIT,
                 "--validation", store.uri_for("validation")]) == 0
    assert main(["product", "add", "nested", "--train", str(nested), "--archive", archive, *SMALL_FIT]) == 0
    with session_scope() as session:  # as stored before the check
        session.scalars(select(Product).where(Product.name == "nested")).one().validation_uri = \
            str(nested / "validation")
    for name, example in (("linked", f"{linked}/more/d0.png"), ("nested", f"{nested}/validation/")):
        assert main(["fit", name, "--wait"]) != 0
        version, job = _latest(name)
        assert job.status == "failed" and not version.is_active
        assert "training image(s) are also validation images" in job.error and example in job.error
    assert "4 training image(s)" in _latest("linked")[1].error  # d0-d3, each seen through the link
    assert "11 training image(s)" in _latest("nested")[1].error  # 8 validation images and their 3 masks


def test_an_image_reviewed_good_that_is_a_validation_image_fails_the_fit(store: Storage) -> None:
    """It would enter the bank, and the thresholds would be set on an image the model has learned."""
    _add(store, "reviewed", "--validation", store.uri_for("validation"))
    assert main(["fit", "reviewed", "--wait"]) == 0
    assert main(["score", "reviewed", "--images", store.uri_for("validation/good"), "--wait"]) == 0
    assert main(["review", "mark", "reviewed", store.uri_for("validation/good/g0.png"), "--good"]) == 0
    assert main(["fit", "reviewed", "--wait"]) != 0
    version, job = _latest("reviewed")
    assert job.status == "failed" and not version.is_active
    assert "validation/good/g0.png" in job.error and "totalrecall review clear" in job.error
