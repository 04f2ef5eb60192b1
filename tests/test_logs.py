"""Structured logs (`common.logs`): the format itself, and the events of a real fit and nightly-style score
run on the embedded default (SQLite, a local folder, tasks in-process)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.engine.config import PatchCoreConfig
from common.logs import EventFormatter, format_event, log_context, log_event, parse_fields, setup_logging
from common.settings import get_settings
from common.storage import Storage, open_storage
from common.synthetic import nominal_image, plant_defect, png_bytes
from scheduler.adhoc import enqueue_fits, score_images
from scheduler.products import add_product
from tests.conftest import embedded_default

SIZE = 64
PRODUCT = "cap-line.2"
CONFIG = PatchCoreConfig(image_size=SIZE, coreset_ratio=0.1, holdout_fraction=0.25)


def _record(message: str, exc_info: bool = False) -> logging.LogRecord:
    info = sys.exc_info() if exc_info else None
    return logging.LogRecord("workers.scoring", logging.ERROR, __file__, 1, message, None, info)


def test_values_are_quoted_only_when_needed_and_redacted() -> None:
    message = format_event("chunk_failed", {
        "job": 12, "product": "bottle", "seconds": 4.2004, "ok": False, "skipped": None, "empty": "",
        "error": 'OperationalError: could not connect to "postgresql://tr:s3cret@db:5432/tr"\nline 2'})
    assert message.startswith("event=chunk_failed job=12 product=bottle seconds=4.2 ok=false empty=\"\" ")
    assert "s3cret" not in message and "\n" not in message and "skipped" not in message
    fields = parse_fields(message)
    assert fields == {"event": "chunk_failed", "job": "12", "product": "bottle", "seconds": "4.2",
                      "ok": "false", "empty": "",
                      "error": 'OperationalError: could not connect to "postgresql://tr:***@db:5432/tr"\nline 2'}


def test_formatter_writes_one_redacted_line_with_time_level_and_logger() -> None:
    formatter = EventFormatter()
    line = formatter.format(_record("Task failed\nfor redis://:hunter2@redis:6379/0"))
    assert "\n" not in line and "hunter2" not in line and "redis://:***@redis:6379/0" in line
    stamp, level, name, message = line.split(" ", 3)
    assert stamp.endswith("Z") and "T" in stamp and (level, name) == ("ERROR", "workers.scoring")
    assert message.startswith("Task failed\\nfor")
    try:
        raise OSError("s3://key:topsecret@bucket unreachable")
    except OSError:
        line = formatter.format(_record("event=boom job=1", exc_info=True))
    assert "\n" not in line and "topsecret" not in line
    fields = parse_fields(line.split(" ", 3)[3])
    assert fields["event"] == "boom" and fields["traceback"].startswith("Traceback (most recent call last):\n")


def test_job_and_product_come_first_and_setup_is_idempotent(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.logs")
    with caplog.at_level(logging.INFO), log_context(job=7, product="bottle"):
        log_event(logger, logging.INFO, "thing_done", images=3, product="cap", version=2)
    assert caplog.messages == ["event=thing_done job=7 product=cap version=2 images=3"]
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        setup_logging("INFO")
        setup_logging("DEBUG")
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1 and isinstance(added[0].formatter, EventFormatter)
        assert root.level == logging.DEBUG
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Storage]:
    """The embedded default in a temporary home, chunks of 4; product `PRODUCT` registered, not fitted."""
    with embedded_default(tmp_path, TOTALRECALL_CHUNK_SIZE="4"):
        store = open_storage(get_settings().storage_url)
        for i in range(12):
            store.put_bytes(f"train/cap/n{i:02d}.png", png_bytes(nominal_image(i, SIZE)))
        add_product(PRODUCT, store.uri_for("train/cap"), store.uri_for("archive/{date}/cap"), CONFIG)
        yield store


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, str]]:
    """The fields of each `event` line, each formatted by the real formatter first (one line)."""
    formatter = EventFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    assert all("\n" not in line for line in lines)
    found = [parse_fields(line.split(" ", 3)[3]) for line in lines]
    return [f for f in found if f.get("event") == event]


def test_fit_and_chunks_log_start_and_end_with_job_and_product(embedded: Storage,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    (fit,) = enqueue_fits([PRODUCT])  # in-process: the fit runs here
    (started,) = _events(caplog, "fit_started")
    (finished,) = _events(caplog, "fit_finished")
    for fields in (started, finished):
        assert (fields["job"], fields["product"], fields["version"]) == (str(fit.job_id), PRODUCT, "1")
    assert started["images"] == "12" and started["backbone"] == CONFIG.backbone
    assert finished["activated"] == "true" and float(finished["seconds"]) > 0

    for i in range(6):
        image = nominal_image(1000 + i, SIZE)
        if i == 1:
            image, _ = plant_defect(image, i)
        embedded.put_bytes(f"batch/cap/img {i}.png", png_bytes(image))
    embedded.put_bytes("batch/cap/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    caplog.clear()
    job = score_images(PRODUCT, embedded.uri_for("batch/cap"))  # 7 images: chunks of 4 and 3
    (scheduled,) = _events(caplog, "job_scheduled")
    assert (scheduled["job"], scheduled["product"], scheduled["images"]) == (str(job.job_id), PRODUCT, "7")
    starts, ends = _events(caplog, "chunk_started"), _events(caplog, "chunk_scored")
    assert len(starts) == len(ends) == 2
    for fields in starts + ends:
        assert (fields["job"], fields["product"], fields["version"]) == (str(job.job_id), PRODUCT, "1")
    assert sorted(int(f["images"]) for f in starts) == sorted(int(f["images"]) for f in ends) == [3, 4]
    assert sum(int(f["scored"]) for f in ends) == 6 and sum(int(f["failed"]) for f in ends) == 1
    assert all(float(f["seconds"]) > 0 and "stopped" not in f for f in ends)
    (loaded,) = _events(caplog, "model_loaded")  # once per process, inside the first chunk
    assert loaded["job"] == str(job.job_id) and loaded["source"] == "storage"


def test_every_event_the_code_logs_is_listed_in_the_readme() -> None:
    """Operators grep for `event=NAME`: the README's list must name every event the product emits."""
    import re

    root = Path(__file__).resolve().parents[1]
    emitted = set()
    for package in ("common", "workers", "scheduler", "totalrecall"):
        for source in (root / package).rglob("*.py"):
            emitted |= set(re.findall(r'log_event\([^")]*"([a-z_]+)"', source.read_text()))
    assert len(emitted) > 30  # the pattern still finds the calls
    readme = (root / "README.md").read_text()
    assert sorted(e for e in emitted if f"`{e}`" not in readme) == []
