"""TotalRecall settings, read from `TOTALRECALL_*` environment variables in one place.

Every process (CLI, workers, scheduler) builds its configuration through `get_settings()`, so the
defaults and the validation rules live here. Values that may carry secrets (database and broker URLs)
must go through `redact_url` before they are logged or printed; `Settings.__repr__` already does so.

The standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`) are read
by boto3 itself and are not copied here; `AWS_ENDPOINT_URL` is, because the storage layer passes it
explicitly as `endpoint_url` (older botocore releases ignore the variable).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

PREFIX = "TOTALRECALL_"
DEFAULT_HOME = "./totalrecall-data"
DEFAULT_CHUNK_SIZE = 64
DEFAULT_MODEL_CACHE_MB = 2048
DEFAULT_MODEL_DISK_CACHE_MB = 20480
DEFAULT_NIGHTLY_AT = "02:00"
DEFAULT_S3_MAX_ATTEMPTS = 6
DEFAULT_DOWNLOAD_THREADS = 8
# Celery time limits (soft, hard) in seconds; the soft one lets a task mark its job failed cleanly.
DEFAULT_SCORE_TIME_LIMITS = (15 * 60, 20 * 60)
DEFAULT_FIT_TIME_LIMITS = (2 * 3600, int(2.5 * 3600))
# Redis redelivers a task whose worker died (unacknowledged) after this many seconds. It must exceed the
# longest task (the fit hard limit), or a long fit would be handed to a second worker while still running.
DEFAULT_VISIBILITY_TIMEOUT = 3 * 3600
# Sending a task retries this long while the broker is unreachable (then the job fails, saying so).
DEFAULT_ENQUEUE_RETRY_SECONDS = 60
# A database connection is retried this long while the server is unreachable or restarting.
DEFAULT_DB_RETRY_SECONDS = 60
# Workers look for work the broker lost (e.g. a Redis restart without persistence) this often, and leave
# jobs younger than the grace period alone (their tasks may still be being sent).
DEFAULT_RECOVERY_INTERVAL = 60
DEFAULT_RECOVERY_GRACE = 300
DEFAULT_S3_TIMEOUT = 60  # seconds to wait for an S3 response before botocore retries
# Image limits: refused above MAX_IMAGE_PIXELS (from the header, never decoded) or MAX_IMAGE_BYTES (from
# the object's size, never downloaded); reduced to MAX_IMAGE_SIDE while decoding.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
DEFAULT_MAX_IMAGE_SIDE = 4096
DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
# Backbones a worker process builds when it starts, so the first chunk of a night does not wait for them.
DEFAULT_PRELOAD_BACKBONES = ("efficientnet_lite0",)
# Which scored images get their mask and heatmap PNGs written: "findings" (an anomalous verdict or a
# non-empty mask), "all", or "none" (result rows only). Every scored image gets its row either way.
SAVE_MAPS_CHOICES = ("findings", "all", "none")
DEFAULT_SAVE_MAPS = "findings"
DEFAULT_DRIFT_LEVEL = 0.5  # common.drift: a run's median score halfway from nominal to the threshold

# Upper bound of the integer settings: 2**31 - 1 (68 years in seconds, 2 PB in MB), far above any real value;
# MAX_SIZE for the image limits in bytes and pixels (1 TiB).
MAX_INT = 2**31 - 1
MAX_SIZE = 2**40

REDACTED = "***"
# Query parameters whose values are secrets (e.g. `?password=` accepted by libpq and redis-py).
_SECRET_QUERY_KEYS = re.compile(r"pass|secret|token|key|credential", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)[^\s@/]*@")
_HH_MM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


class SettingsError(ValueError):
    """A setting has an unusable value; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Paths are absolute; empty environment variables count as unset."""

    home: Path
    database_url: str
    broker_url: str | None  # None: tasks run in-process, no Celery broker
    storage_url: str  # s3://bucket/prefix or a local folder
    chunk_size: int
    cache_dir: Path  # worker's local model-artifact cache
    model_cache_mb: int  # bound of the in-memory model cache
    nightly_at: str  # "HH:MM", normalised to two-digit hour
    readonly_password: str | None = field(default=None, repr=False)
    aws_endpoint_url: str | None = None
    s3_max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS
    download_threads: int = DEFAULT_DOWNLOAD_THREADS  # concurrent image downloads per scoring task
    score_time_limits: tuple[int, int] = DEFAULT_SCORE_TIME_LIMITS  # (soft, hard) seconds per chunk
    fit_time_limits: tuple[int, int] = DEFAULT_FIT_TIME_LIMITS  # (soft, hard) seconds per fit
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    enqueue_retry_seconds: int = DEFAULT_ENQUEUE_RETRY_SECONDS
    db_retry_seconds: int = DEFAULT_DB_RETRY_SECONDS
    recovery_interval: int = DEFAULT_RECOVERY_INTERVAL
    recovery_grace: int = DEFAULT_RECOVERY_GRACE
    s3_timeout: int = DEFAULT_S3_TIMEOUT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    preload_backbones: tuple[str, ...] = DEFAULT_PRELOAD_BACKBONES  # built when a worker process starts
    save_maps: str = DEFAULT_SAVE_MAPS  # which scored images get mask and heatmap PNGs (SAVE_MAPS_CHOICES)
    drift_level: float = DEFAULT_DRIFT_LEVEL  # score jobs warn from this drift level (common.drift); 0: off
    model_disk_cache_mb: int = DEFAULT_MODEL_DISK_CACHE_MB  # bound of the on-disk model cache (cache_dir)
    # Fault-injection tests only: seconds a scoring task sleeps after each image (and a fit before each
    # training image), so that "in the middle of a chunk" lasts long enough to kill a worker in.
    test_chunk_delay: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(_get(env, "HOME") or DEFAULT_HOME).expanduser().absolute()
        return cls(
            home=home,
            database_url=_database_url(env, home),
            broker_url=_broker_url(env),
            storage_url=_storage_url(env, home),
            chunk_size=_positive_int(env, "CHUNK_SIZE", DEFAULT_CHUNK_SIZE),
            cache_dir=Path(_get(env, "CACHE_DIR") or home / "cache").expanduser().absolute(),
            model_cache_mb=_positive_int(env, "MODEL_CACHE_MB", DEFAULT_MODEL_CACHE_MB),
            model_disk_cache_mb=_positive_int(env, "MODEL_DISK_CACHE_MB", DEFAULT_MODEL_DISK_CACHE_MB),
            nightly_at=_hh_mm(env, "NIGHTLY_AT", DEFAULT_NIGHTLY_AT),
            readonly_password=_get(env, "READONLY_PASSWORD"),
            aws_endpoint_url=aws_endpoint_url(env),
            s3_max_attempts=s3_max_attempts(env),
            download_threads=_positive_int(env, "DOWNLOAD_THREADS", DEFAULT_DOWNLOAD_THREADS),
            score_time_limits=_time_limits(env, "SCORE", DEFAULT_SCORE_TIME_LIMITS),
            fit_time_limits=_time_limits(env, "FIT", DEFAULT_FIT_TIME_LIMITS),
            visibility_timeout=_positive_int(env, "VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT),
            enqueue_retry_seconds=_positive_int(env, "ENQUEUE_RETRY_SECONDS", DEFAULT_ENQUEUE_RETRY_SECONDS),
            db_retry_seconds=_positive_int(env, "DB_RETRY_SECONDS", DEFAULT_DB_RETRY_SECONDS),
            recovery_interval=_positive_int(env, "RECOVERY_INTERVAL", DEFAULT_RECOVERY_INTERVAL),
            recovery_grace=_positive_int(env, "RECOVERY_GRACE", DEFAULT_RECOVERY_GRACE),
            s3_timeout=s3_timeout(env),
            max_image_pixels=_positive_int(env, "MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS, MAX_SIZE),
            max_image_side=_positive_int(env, "MAX_IMAGE_SIDE", DEFAULT_MAX_IMAGE_SIDE),
            max_image_bytes=_positive_int(env, "MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, MAX_SIZE),
            preload_backbones=_names(env, "PRELOAD_BACKBONES", DEFAULT_PRELOAD_BACKBONES),
            save_maps=_choice(env, "SAVE_MAPS", SAVE_MAPS_CHOICES, DEFAULT_SAVE_MAPS),
            drift_level=_non_negative(env, "DRIFT_LEVEL", DEFAULT_DRIFT_LEVEL),
            test_chunk_delay=_seconds(env, "TEST_CHUNK_DELAY"),
        )._checked()

    def _checked(self) -> Settings:
        if self.recovery_grace <= self.enqueue_retry_seconds:
            raise SettingsError(f"{PREFIX}RECOVERY_GRACE ({self.recovery_grace}) must exceed "
                                f"{PREFIX}ENQUEUE_RETRY_SECONDS ({self.enqueue_retry_seconds}): a younger job "
                                "may still be sending its tasks")
        return self

    def risks(self) -> list[str]:
        """Allowed combinations that a deployment should know about (workers log them when they start)."""
        longest = max(self.fit_time_limits[1], self.score_time_limits[1])
        if self.broker_url is not None and self.visibility_timeout <= longest:
            return [f"{PREFIX}VISIBILITY_TIMEOUT ({self.visibility_timeout} s) is not above the longest task's "
                    f"hard time limit ({longest} s): Redis hands a task still running after it to a second "
                    "worker (no result is written twice, but the work is done twice)"]
        return []

    @property
    def tasks_in_process(self) -> bool:
        """True when no broker is configured and tasks run in the calling process."""
        return self.broker_url is None

    @property
    def nightly_time(self) -> tuple[int, int]:
        """`nightly_at` as (hour, minute), e.g. for a Celery crontab."""
        hour, minute = self.nightly_at.split(":")
        return int(hour), int(minute)

    def redacted(self) -> dict[str, str]:
        """All settings as display strings, with passwords hidden (safe to log or print)."""
        return {
            "home": str(self.home),
            "database_url": redact_url(self.database_url),
            "broker_url": redact_url(self.broker_url) if self.broker_url else "(none: in-process)",
            "storage_url": redact_url(self.storage_url),
            "chunk_size": str(self.chunk_size),
            "cache_dir": str(self.cache_dir),
            "model_cache_mb": str(self.model_cache_mb),
            "model_disk_cache_mb": str(self.model_disk_cache_mb),
            "nightly_at": self.nightly_at,
            "readonly_password": REDACTED if self.readonly_password else "(unset)",
            "aws_endpoint_url": redact_url(self.aws_endpoint_url) if self.aws_endpoint_url else "(default)",
            "s3_max_attempts": str(self.s3_max_attempts),
            "download_threads": str(self.download_threads),
            "score_time_limits": "{}/{} s".format(*self.score_time_limits),
            "fit_time_limits": "{}/{} s".format(*self.fit_time_limits),
            "visibility_timeout": f"{self.visibility_timeout} s",
            "enqueue_retry_seconds": f"{self.enqueue_retry_seconds} s",
            "db_retry_seconds": f"{self.db_retry_seconds} s",
            "recovery": f"every {self.recovery_interval} s, jobs older than {self.recovery_grace} s",
            "s3_timeout": f"{self.s3_timeout} s",
            "image_limits": f"{self.max_image_pixels} px, side {self.max_image_side}, {self.max_image_bytes} B",
            "preload_backbones": ",".join(self.preload_backbones) or "(none)",
            "save_maps": self.save_maps,
            "drift_level": f"{self.drift_level:g}" if self.drift_level else "(off)",
            "test_chunk_delay": f"{self.test_chunk_delay:g} s",
        }

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({body})"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read from the environment once."""
    return Settings.from_env()


def reset_settings_cache() -> None:
    """Forget the cached settings so the next `get_settings()` re-reads the environment (tests)."""
    get_settings.cache_clear()


def aws_endpoint_url(environ: Mapping[str, str] | None = None) -> str | None:
    """`AWS_ENDPOINT_URL` (e.g. a moto or MinIO server), or None for AWS itself."""
    env = os.environ if environ is None else environ
    return env.get("AWS_ENDPOINT_URL", "").strip() or None


def s3_max_attempts(environ: Mapping[str, str] | None = None) -> int:
    """Total attempts per S3 request (botocore 'standard' retry mode), `TOTALRECALL_S3_MAX_ATTEMPTS`."""
    env = os.environ if environ is None else environ
    return _positive_int(env, "S3_MAX_ATTEMPTS", DEFAULT_S3_MAX_ATTEMPTS)


def s3_timeout(environ: Mapping[str, str] | None = None) -> int:
    """Seconds to wait for an S3 response before a retry, `TOTALRECALL_S3_TIMEOUT`."""
    env = os.environ if environ is None else environ
    return _positive_int(env, "S3_TIMEOUT", DEFAULT_S3_TIMEOUT)


def redact_url(url: str) -> str:
    """`url` with any password (userinfo or secret-looking query parameter) replaced by `***`.

    Strings that are not URLs (plain paths) come back unchanged. When the URL is ambiguous (an
    unescaped `@` in the password) more is hidden rather than less.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        userinfo, _, hostpart = rest.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            rest = f"{user}:{REDACTED}@{hostpart}"
    redacted = f"{scheme}://{rest}"
    parts = urlsplit(redacted)
    if not parts.query:
        return redacted
    query = [(k, REDACTED if _SECRET_QUERY_KEYS.search(k) else v) for k, v in parse_qsl(parts.query, True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def redact_text(text: str) -> str:
    """`text` (e.g. an exception message) with the password of every URL in it replaced by `***`."""
    return _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(PREFIX + name, "").strip()
    return value or None


def _database_url(env: Mapping[str, str], home: Path) -> str:
    """A PostgreSQL or SQLite URL; a relative SQLite path is made absolute (every process sees the same
    file) and an in-memory SQLite database is refused (each connection would see its own, empty one)."""
    raw = _get(env, "DATABASE_URL")
    if raw is None:
        return f"sqlite:///{home / 'totalrecall.db'}"
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError) as exc:
        # not echoed: a URL that does not parse may not be redacted either (postgresql//u:secret@h/db)
        raise SettingsError(f"{PREFIX}DATABASE_URL is not a database URL ({exc}): use "
                            "postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH") from None
    if parsed.get_backend_name() != "sqlite":
        return raw
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise SettingsError(f"{PREFIX}DATABASE_URL {raw!r} is an in-memory SQLite database, which every "
                            "connection and process sees empty: use sqlite:///PATH")
    path = str(Path(database).expanduser().absolute())
    if database.startswith("file:") or path == database:
        return raw
    return parsed.set(database=path).render_as_string(hide_password=False)


def _storage_url(env: Mapping[str, str], home: Path) -> str:
    """s3://bucket/prefix, file://PATH or a folder (made absolute: every process sees the same one)."""
    raw = _get(env, "STORAGE_URL")
    if raw is None:
        return str(home / "storage")
    if raw.startswith(("s3://", "file://")):
        if raw.startswith("s3://") and not raw[len("s3://"):].split("/", 1)[0]:
            raise SettingsError(f"{PREFIX}STORAGE_URL {redact_url(raw)!r} names no bucket: use s3://BUCKET/PREFIX")
        return raw
    if "://" in raw:
        raise SettingsError(f"{PREFIX}STORAGE_URL {redact_url(raw)!r}: use s3://BUCKET/PREFIX, file://PATH or a "
                            "folder")
    return str(Path(raw).expanduser().absolute())


def _broker_url(env: Mapping[str, str]) -> str | None:
    """redis:// or rediss:// (the broker and the recovery sweep speak Redis); unset: tasks in-process."""
    raw = _get(env, "BROKER_URL")
    if raw is not None and not raw.startswith(("redis://", "rediss://")):
        raise SettingsError(f"{PREFIX}BROKER_URL {redact_url(raw)!r}: use redis://HOST:PORT/DB (or rediss://), "
                            "or leave it unset to run tasks in-process")
    return raw


def _positive_int(env: Mapping[str, str], name: str, default: int, maximum: int = MAX_INT) -> int:
    """An integer from 1 to `maximum` (larger counts or seconds are typos, and overflow timers and
    timedeltas)."""
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 0 < value <= maximum:
        raise SettingsError(f"{PREFIX}{name} must be a positive integer up to {maximum}, got {raw!r}")
    return value


def _names(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of names; `none` for an empty list (an empty variable counts as unset)."""
    raw = _get(env, name)
    if raw is None:
        return default
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    return () if names == ("none",) else names


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise SettingsError(f"{PREFIX}{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw.lower()


def _seconds(env: Mapping[str, str], name: str) -> float:
    """A non-negative number of seconds (default 0)."""
    return _non_negative(env, name, 0.0, "number of seconds")


def _non_negative(env: Mapping[str, str], name: str, default: float, what: str = "number") -> float:
    """A finite non-negative number."""
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{PREFIX}{name} must be a non-negative {what}, got {raw!r}")
    return value


def _hh_mm(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _get(env, name) or default
    match = _HH_MM.match(raw)
    if not match:
        raise SettingsError(f"{PREFIX}{name} must be a time of day as HH:MM (24h), got {raw!r}")
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def _time_limits(env: Mapping[str, str], task: str, default: tuple[int, int]) -> tuple[int, int]:
    """(soft, hard) from `TOTALRECALL_<TASK>_SOFT_TIME_LIMIT` and `TOTALRECALL_<TASK>_TIME_LIMIT`."""
    soft = _positive_int(env, f"{task}_SOFT_TIME_LIMIT", default[0])
    hard = _positive_int(env, f"{task}_TIME_LIMIT", max(default[1], soft + 60))
    if soft >= hard:
        raise SettingsError(f"{PREFIX}{task}_SOFT_TIME_LIMIT ({soft}) must be below "
                            f"{PREFIX}{task}_TIME_LIMIT ({hard})")
    return soft, hard
