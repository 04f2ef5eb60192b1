"""Spooling a fit's image loaders: each called once, its bytes or array on disk, its failure replayed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.engine.spool import spool
from common.storage import StorageNotFound, StorageUnavailable


def test_each_loader_is_called_once_and_read_back_from_disk(tmp_path) -> None:
    calls = []
    array = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)[:, ::2]  # not contiguous

    def loader(value):
        def load():
            calls.append(value)
            if isinstance(value, str) and value == "missing":
                raise StorageNotFound("s3://b/missing.png: no such object")
            return value

        return load

    given = tmp_path / "given.png"
    sources = [loader(b"\x89PNG bytes"), loader(array), loader("missing"), given, loader(str(given))]
    out = spool(sources, tmp_path)
    assert len(calls) == 4
    assert isinstance(out[0], Path) and out[0].read_bytes() == b"\x89PNG bytes"
    assert np.array_equal(out[1](), array)
    with pytest.raises(StorageNotFound, match="no such object"):
        out[2]()
    assert out[3] is given and out[4] == str(given)
    assert len(calls) == 4  # reading the spooled images downloads nothing


def test_no_room_on_disk_keeps_the_loaders(tmp_path) -> None:
    sources = [lambda: b"png", lambda: np.zeros((4, 4, 3), np.uint8)]
    room = shutil.disk_usage(tmp_path).free
    out = spool(sources, tmp_path, reserve_bytes=room + 2**30)
    assert out == sources and list(tmp_path.iterdir()) == []


def test_a_storage_outage_fails_the_spool(tmp_path) -> None:
    def down():
        raise StorageUnavailable("S3 endpoint unreachable")

    with pytest.raises(StorageUnavailable):  # the fit fails and is retried: no image is marked bad
        spool([lambda: b"png", down], tmp_path)
