"""A product's region of interest through the CLI: `product add|set --roi`, a fit that stores it, score jobs
that do not flag a defect outside it, and clear failures for regions that cannot be used.

In-process on the embedded default (SQLite, local folder, tasks run eagerly): the CLI's own `main`, real
fits and real score jobs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import select

from common.db import Job, ModelVersion, Product, Result, session_scope
from common.storage import Storage
from common.synthetic import nominal_image, plant_defect, png_bytes
from tests.conftest import SMALL_FIT, embedded_with_training_images
from totalrecall.cli import main

SIZE = 96
NAME = "bracket"
EDGE = 56  # the region: every column left of it


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    with embedded_with_training_images(tmp_path_factory.mktemp("home"), f"train/{NAME}", 12) as storage:
        region = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        region[:, :EDGE] = 255
        storage.put_bytes("setup/roi.png", png_bytes(region))
        for name, x in (("inside", 28), ("outside", 80)):
            stained, _ = plant_defect(nominal_image(300, SIZE), 1, kind="stain", center=(48, x))
            storage.put_bytes(f"night/{name}.png", png_bytes(stained))
        yield storage


def _add(store: Storage, *extra: str) -> int:
    return main(["product", "add", NAME, "--train", store.uri_for(f"train/{NAME}"),
                 "--archive", store.uri_for(f"archive/{{date}}/{NAME}"), *SMALL_FIT, *extra])


def _verdicts() -> dict[str, bool]:
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.kind == "score").order_by(Job.id.desc())).first()
        rows = session.scalars(select(Result).where(Result.job_id == job.id)).all()
    return {r.image_uri.rsplit("/", 1)[1].removesuffix(".png"): bool(r.is_anomalous) for r in rows}


def _newest() -> ModelVersion:
    with session_scope() as session:
        return session.scalars(select(ModelVersion).join(Product).where(Product.name == NAME)
                               .order_by(ModelVersion.version.desc())).first()


def test_a_stain_outside_the_region_is_not_flagged(store: Storage, capsys) -> None:
    assert _add(store, "--roi", store.uri_for("setup/roi.png")) == 0
    assert main(["fit", NAME, "--wait"]) == 0
    assert _newest().validation["roi_fraction"] == pytest.approx(EDGE / SIZE, abs=1e-3)
    capsys.readouterr()
    assert main(["model", "list", NAME]) == 0
    assert f"roi {EDGE / SIZE:.0%}" in capsys.readouterr().out.splitlines()[2]
    assert main(["score", NAME, "--images", store.uri_for("night"), "--wait"]) == 0
    assert _verdicts() == {"inside": True, "outside": False}

    assert main(["product", "set", NAME, "--center-crop", "64", "--resize", "square"]) == 2
    assert "does not combine with a center crop" in capsys.readouterr().err
    assert main(["product", "set", NAME, "--roi", ""]) == 0  # the whole image again
    assert main(["fit", NAME, "--wait"]) == 0
    assert "roi_fraction" not in _newest().validation
    assert main(["score", NAME, "--images", store.uri_for("night"), "--wait"]) == 0
    assert _verdicts() == {"inside": True, "outside": True}  # the stain outside is a defect to the part


@pytest.mark.parametrize(("roi", "message"), [
    ("setup/missing.png", "StorageNotFound"),
    ("setup/black.png", "no pixel to inspect"),
    ("setup/not-an-image.png", "ImageDecodeError"),
])
def test_a_region_that_cannot_be_used_fails_the_fit_saying_why(store: Storage, roi: str, message: str) -> None:
    store.put_bytes("setup/black.png", png_bytes(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)))
    store.put_bytes("setup/not-an-image.png", b"GIF89a broken")
    if _newest() is None:
        assert _add(store) == 0
    assert main(["product", "set", NAME, "--roi", store.uri_for(roi)]) == 0
    assert main(["fit", NAME, "--wait"]) != 0
    version = _newest()
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.model_version_id == version.id)).one()
        assert job.status == "failed" and f"region of interest {store.uri_for(roi)}: " in job.error
        assert message in job.error, job.error
    assert version.status == "failed" and not version.is_active
