"""Structured logs: one line per event, `event=NAME key=value ...`, secrets redacted.

The workers and the scheduler log through `log_event`; `log_context` adds fields (job, product, model
version) to every event logged inside it, so e.g. a database retry during a chunk names its job. Lines look
like

    2026-06-02T02:00:13.512Z INFO workers.scoring event=chunk_scored job=12 product=bottle version=3 ...

Values with spaces, quotes, `=` or control characters are JSON-quoted (`error="OSError: no such file"`);
`parse_fields` reads a message back. `setup_logging` installs that format on the root logger (the CLI,
`totalrecall worker` and beat); other libraries' messages (Celery's) keep their text on one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date, datetime
from typing import Any

from common.settings import redact_text

MAX_VALUE_CHARS = 2000
LEADING = ("job", "product", "version")  # always first, in this order, when present
_BARE = re.compile(r'[^\s"=\\]+')
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
_context: ContextVar[Mapping[str, Any] | None] = ContextVar("totalrecall_log_context", default=None)


def format_value(value: Any) -> str:
    """One value: bare when safe, JSON-quoted otherwise; text is redacted and capped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    if isinstance(value, date | datetime):
        value = value.isoformat()
    text = redact_text(str(value))[:MAX_VALUE_CHARS]
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def format_event(event: str, fields: Mapping[str, Any]) -> str:
    """`event=EVENT job=.. product=.. version=..` then the other fields in order; None values left out."""
    ordered = {key: fields[key] for key in LEADING if key in fields} | dict(fields)
    parts = [f"event={event}"]
    parts += [f"{key}={format_value(value)}" for key, value in ordered.items() if value is not None]
    return " ".join(parts)


def parse_fields(message: str) -> dict[str, str]:
    """The key=value fields of a message (quoted values decoded), for tools and tests."""
    return {key: json.loads(value) if value.startswith('"') else value
            for key, value in _FIELD.findall(message)}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add `fields` to every `log_event` of this thread (and its context) until the block ends."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def log_event(logger: logging.Logger, level: int, event: str, *, exc_info: bool = False,
              **fields: Any) -> None:
    """Log one event as a key=value line of the context's fields and `fields` (which win)."""
    if logger.isEnabledFor(level):
        message = format_event(event, {**(_context.get() or {}), **fields})
        logger.log(level, message, exc_info=exc_info, stacklevel=2)


class EventFormatter(logging.Formatter):
    """`<UTC time> <LEVEL> <logger> <message>` on one line; a traceback becomes a quoted `traceback=`
    field, and URL passwords anywhere in the line are redacted."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {message}"
        if record.exc_info:
            line += " traceback=" + json.dumps(self.formatException(record.exc_info), ensure_ascii=False)
        return redact_text(line)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (tests replace it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def setup_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr through `EventFormatter` at `level` (replaces an earlier call's handler)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(EventFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
