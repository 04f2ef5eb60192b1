"""Shared fixtures: real services (PostgreSQL, Redis, moto S3) when configured, skips otherwise.

Integration tests use services that are already running; start them with
`deploy/dev-services.sh start && eval "$(deploy/dev-services.sh env)"`. Variables read:

- TOTALRECALL_TEST_PG_URL: SQLAlchemy URL of a PostgreSQL user with CREATEDB and CREATEROLE; each test
  module gets its own throw-away database created (and dropped) through it.
- TOTALRECALL_TEST_REDIS_URL: Redis URL (use a database number nobody else uses; tests may flush it).
- TOTALRECALL_TEST_S3_ENDPOINT: S3 endpoint of a moto server; each test gets a fresh bucket.
- TOTALRECALL_TEST_REQUIRE_SERVICES=1: fail instead of skip when a service is missing (CI).
- TOTALRECALL_SERVICES_SCRIPT: path of dev-services.sh, for fault-injection tests that stop/start services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from common.settings import reset_settings_cache


@dataclass(frozen=True)
class Services:
    """Endpoints of the running test services (None: not configured or not reachable)."""

    pg_url: str | None
    redis_url: str | None
    s3_endpoint: str | None
    script: str | None


def _reachable(url: str | None, default_port: int) -> bool:
    if not url:
        return False
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _missing(what: str, variable: str) -> None:
    reason = f"{what} not available: set {variable} (deploy/dev-services.sh start; eval $(... env))"
    if os.environ.get("TOTALRECALL_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def services() -> Services:
    """All configured services; skips unless PostgreSQL, Redis and S3 are all reachable."""
    found = _detect()
    for value, what, variable in (
        (found.pg_url, "PostgreSQL", "TOTALRECALL_TEST_PG_URL"),
        (found.redis_url, "Redis", "TOTALRECALL_TEST_REDIS_URL"),
        (found.s3_endpoint, "S3 (moto)", "TOTALRECALL_TEST_S3_ENDPOINT"),
    ):
        if value is None:
            _missing(what, variable)
    return found


def _detect() -> Services:
    pg = os.environ.get("TOTALRECALL_TEST_PG_URL") or None
    redis_url = os.environ.get("TOTALRECALL_TEST_REDIS_URL") or None
    s3 = os.environ.get("TOTALRECALL_TEST_S3_ENDPOINT") or None
    return Services(
        pg_url=pg if _reachable(pg, 5432) else None,
        redis_url=redis_url if _reachable(redis_url, 6379) else None,
        s3_endpoint=s3 if _reachable(s3, 443 if (s3 or "").startswith("https") else 80) else None,
        script=os.environ.get("TOTALRECALL_SERVICES_SCRIPT") or None,
    )


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """URL of the PostgreSQL test server (maintenance connection, CREATEDB rights)."""
    url = _detect().pg_url
    if url is None:
        _missing("PostgreSQL", "TOTALRECALL_TEST_PG_URL")
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _detect().redis_url
    if url is None:
        _missing("Redis", "TOTALRECALL_TEST_REDIS_URL")
    return url


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    endpoint = _detect().s3_endpoint
    if endpoint is None:
        _missing("S3 (moto)", "TOTALRECALL_TEST_S3_ENDPOINT")
    return endpoint


@pytest.fixture(scope="module")
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test module (dropped afterwards)."""
    from common.db import fresh_database

    with fresh_database(pg_server_url, "tr_test") as url:
        yield url


def apply_settings() -> None:
    """Re-read the settings after the environment changed: settings cache, Celery app, model cache."""
    from workers.app import app, configure
    from workers.model_cache import reset_model_cache

    reset_settings_cache()
    configure(app)
    reset_model_cache()


@contextlib.contextmanager
def embedded_default(home: Path, **variables: str) -> Iterator[None]:
    """The embedded default (SQLite, local folder, in-process tasks) in `home`, schema created: every
    other TOTALRECALL_* variable unset, `variables` set; the environment is restored afterwards."""
    from common.db import dispose_engines
    from common.migrate import upgrade

    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("TOTALRECALL_")]:
            mp.delenv(name)
        for name, value in {"TOTALRECALL_HOME": str(home), **variables}.items():
            mp.setenv(name, value)
        apply_settings()
        upgrade()
        try:
            yield
        finally:
            dispose_engines()
    apply_settings()


# `totalrecall product add` options of the small, fast products the CLI tests fit (96 px generated parts)
SMALL_FIT = ["--image-size", "96", "--coreset-ratio", "0.1", "--holdout-fraction", "0.25"]


@contextlib.contextmanager
def embedded_with_training_images(home: Path, folder: str, count: int) -> Iterator:
    """`embedded_default` in `home`, with `count` generated nominal 96 px parts under `folder` of its
    storage; yields the storage."""
    from common.settings import get_settings
    from common.storage import open_storage
    from common.synthetic import nominal_image, png_bytes

    with embedded_default(home):
        storage = open_storage(get_settings().storage_url)
        for i in range(count):
            storage.put_bytes(f"{folder}/n{i:02d}.png", png_bytes(nominal_image(i, 96)))
        yield storage


@pytest.fixture
def sqlite_url(tmp_path) -> Iterator[str]:
    """URL of a new SQLite database file in tmp_path."""
    from common.db import dispose_engines

    url = f"sqlite:///{tmp_path / 'totalrecall.db'}"
    yield url
    dispose_engines(url)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Points boto3 (and `common.storage`) at the moto server for this test; returns the endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    reset_settings_cache()
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> Iterator[str]:
    """A fresh, empty bucket on moto; yields its URI `s3://<bucket>/` (emptied and deleted afterwards)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    bucket = f"tr-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/"
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
    except Exception as exc:  # e.g. moto restarted by a fault-injection test: nothing left to clean
        warnings.warn(f"could not delete test bucket {bucket}: {exc}", stacklevel=1)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Each test sees settings read from its own environment (monkeypatched variables included)."""
    reset_settings_cache()
    yield
    reset_settings_cache()


def without_root_powers() -> tuple[str, ...]:
    """A command prefix that runs a command without the power to read any file (root's), or skips."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("runs as root and setpriv is not available to drop the power to read any file")
    drop = "-dac_override,-dac_read_search"
    return setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"
