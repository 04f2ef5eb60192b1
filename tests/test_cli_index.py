"""`totalrecall product add --index ... --precision ...`: the kNN index and the backbone arithmetic chosen
per product, stored, fitted and loaded.

In-process on the embedded default (SQLite, local folder, tasks run eagerly): the CLI's own `main`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from common.db import ModelVersion, Product, session_scope
from common.engine.artifact import META_FILE
from common.engine.patchcore import PatchCore
from common.storage import Storage
from tests.conftest import SMALL_FIT, embedded_with_training_images
from totalrecall.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    """An embedded home with the schema and 16 training images under train/part."""
    with embedded_with_training_images(tmp_path_factory.mktemp("home"), "train/part", 16) as storage:
        yield storage


def _add(store: Storage, name: str, *options: str) -> int:
    return main(["product", "add", name, "--train", store.uri_for("train/part"),
                 "--archive", store.uri_for(f"archive/{{date}}/{name}"), *SMALL_FIT, *options])


def _fit_config(name: str) -> dict:
    with session_scope() as session:
        return session.scalars(select(Product).where(Product.name == name)).one().fit_config


def test_index_options_are_stored_and_the_fit_builds_that_index(store: Storage) -> None:
    assert _add(store, "part-ivf", "--index", "ivf_flat", "--index-min-bank", "0", "--index-nprobe", "2") == 0
    config = _fit_config("part-ivf")
    assert (config["index"], config["index_min_bank"], config["index_nprobe"]) == ("ivf_flat", 0, 2)
    assert main(["fit", "part-ivf", "--wait"]) == 0

    with session_scope() as session:
        version = session.scalars(select(ModelVersion).where(ModelVersion.is_active)).one()
    folder = Path(version.artifact_uri)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["config"]["index"] == "ivf_flat" and meta["index"]["kind"] == "ivf_flat"
    assert meta["stats"]["index"] == "ivf_flat" and meta["stats"]["index_seconds"] >= 0
    model = PatchCore.load(folder, version.sha256, device="cpu")
    assert model.index.spec.kind == "ivf_flat" and model.index.state is not None
    assert model.index.spec.nprobe == min(2, model.index.spec.nlist)


def test_precision_option_is_stored_and_the_model_keeps_it(store: Storage) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CPUs without native bf16 emulate it (slow)
        assert _add(store, "part-bf16", "--precision", "bf16") == 0
        assert _fit_config("part-bf16")["precision"] == "bf16"
        assert main(["fit", "part-bf16", "--wait"]) == 0
        with session_scope() as session:
            product = session.scalars(select(Product).where(Product.name == "part-bf16")).one()
            version = session.scalars(select(ModelVersion).where(ModelVersion.product_id == product.id,
                                                                 ModelVersion.is_active)).one()
        folder = Path(version.artifact_uri)
        assert json.loads((folder / META_FILE).read_text())["config"]["precision"] == "bf16"
        assert PatchCore.load(folder, version.sha256, device="cpu").config.precision == "bf16"
    assert _add(store, "part-auto") == 0
    assert _fit_config("part-auto")["precision"] == "auto"


def test_default_is_the_exact_index(store: Storage) -> None:
    assert _add(store, "part-flat") == 0
    config = _fit_config("part-flat")
    assert (config["index"], config["index_min_bank"]) == ("flat", 100_000)


@pytest.mark.parametrize("options, message", [
    (["--index-nprobe", "0"], "index_nprobe >= 1"),
    (["--index-min-bank", "-1"], "index_min_bank"),
])
def test_invalid_index_values_are_a_clear_cli_error(store: Storage, capsys: pytest.CaptureFixture,
                                                    options: list[str], message: str) -> None:
    assert _add(store, "part-bad", *options) == 2
    assert message in capsys.readouterr().err
    with session_scope() as session:
        assert session.scalars(select(Product).where(Product.name == "part-bad")).one_or_none() is None


def test_unknown_index_kind_is_refused_by_the_parser(store: Storage, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _add(store, "part-bad", "--index", "hnsw")
    assert exit_info.value.code == 2
    assert "invalid choice: 'hnsw'" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["-1", "0", "x"])
def test_jobs_limit_must_be_positive(limit: str, capsys: pytest.CaptureFixture) -> None:
    from totalrecall.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it before any database is opened
        main(["jobs", "--limit", limit])
    assert exit_info.value.code == 2
    assert f"a whole number of at least 1: not '{limit}'" in capsys.readouterr().err
