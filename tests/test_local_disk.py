"""A worker machine's disk: leftovers of killed tasks swept, the model cache pruned (workers.local_disk)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from common.settings import reset_settings_cache
from workers.local_disk import TIDY_INTERVAL, DiskTidyStep, prune_model_cache, sweep_leftovers

SHA = "ab" * 32
HOUR = 3600


def _make(path: Path, age: float, files: dict[str, float] | None = None, size: int = 10) -> Path:
    """A folder `age` seconds old, with files of the given ages."""
    path.mkdir(parents=True)
    now = time.time()
    for name, file_age in (files or {}).items():
        (path / name).write_bytes(b"x" * size)
        os.utime(path / name, (now - file_age, now - file_age))
    os.utime(path, (now - age, now - age))
    return path


def test_sweep_deletes_only_our_leftovers_untouched_for_longer_than_any_task(tmp_path: Path) -> None:
    cache, scratch = tmp_path / "cache", tmp_path / "tmp"
    partial_old = _make(cache / f".{SHA}-x1", 3 * HOUR, {"bank.safetensors": 3 * HOUR})
    partial_new = _make(cache / f".{SHA}-x2", 60, {"bank.safetensors": 60})
    model = _make(cache / SHA, 9 * HOUR, {"model.json": 9 * HOUR})
    spool_old = _make(scratch / "totalrecall-spool-abc", 3 * HOUR, {"000.png": 3 * HOUR})
    fit_old = _make(scratch / "totalrecall-fit-abc", 5 * HOUR)
    # an old folder with a file still being written (the features of a long fit): in use
    features_busy = _make(scratch / "totalrecall-features-abc", 3 * HOUR, {"features.f32": 5})
    someone_elses = _make(scratch / "pip-build-abc", 9 * HOUR)
    swept = sweep_leftovers(cache, scratch, older_than=2 * HOUR)
    assert sorted(swept) == sorted([partial_old, spool_old, fit_old])
    assert not any(p.exists() for p in swept)
    assert all(p.exists() for p in (partial_new, model, features_busy, someone_elses))
    assert sweep_leftovers(tmp_path / "missing", tmp_path / "missing", 1) == []


def test_prune_deletes_least_recently_used_models_beyond_the_bound(tmp_path: Path) -> None:
    names = [c * 64 for c in "abcd"]
    for age, name in zip((40, 30, 20, 10), names, strict=True):  # a is the least recently used
        _make(tmp_path / name, age, {"bank.safetensors": age}, size=100)
    _make(tmp_path / f".{'e' * 64}-x", 50, {"bank.safetensors": 50}, size=1000)  # not a model: left alone
    assert prune_model_cache(tmp_path, max_bytes=400) == []
    assert prune_model_cache(tmp_path, max_bytes=250) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == names[2:]
    assert prune_model_cache(tmp_path, max_bytes=0, keep=[names[2]]) == []  # d: the most recently used
    assert prune_model_cache(tmp_path, max_bytes=0) == [names[2]]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [names[3]]


def test_workers_tidy_on_their_timer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between restarts too (a pool process killed by the kernel is replaced without one): the worker
    step registered with the app runs the tidy-up on Celery's timer, off the event loop."""
    from workers.app import app

    assert DiskTidyStep in app.steps["worker"]
    scratch, cache = tmp_path / "tmp", tmp_path / "cache"
    for name, value in {"CACHE_DIR": str(cache), "SCORE_SOFT_TIME_LIMIT": "1", "SCORE_TIME_LIMIT": "2",
                        "FIT_SOFT_TIME_LIMIT": "1", "FIT_TIME_LIMIT": "2"}.items():
        monkeypatch.setenv(f"TOTALRECALL_{name}", value)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    reset_settings_cache()

    class Timer:
        def __init__(self) -> None:
            self.calls: list[tuple[float, Any]] = []

        def call_repeatedly(self, seconds: float, fn: Any, priority: int = 0) -> Any:
            self.calls.append((seconds, fn))
            return None

    class Worker:
        timer = Timer()

    try:
        step = DiskTidyStep(Worker())
        step.start(Worker)  # tidies once (nothing to do yet), then on the timer
        leftovers = [_make(scratch / "totalrecall-spool-x", 60), _make(cache / f".{SHA}-y", 60)]
        recent = _make(scratch / "totalrecall-features-z", 0)
        ((seconds, tick),) = Worker.timer.calls
        assert seconds == TIDY_INTERVAL
        tick()
        step.thread.join(30)
    finally:
        reset_settings_cache()
    assert not any(p.exists() for p in leftovers) and recent.exists()
