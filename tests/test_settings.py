"""Settings: defaults, parsing and validation of TOTALRECALL_* variables, secret redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import (
    Settings,
    SettingsError,
    get_settings,
    redact_text,
    redact_url,
    reset_settings_cache,
)


def test_defaults_derive_from_home(tmp_path: Path) -> None:
    s = Settings.from_env({"TOTALRECALL_HOME": str(tmp_path / "home")})
    home = tmp_path / "home"
    assert s.home == home
    assert s.database_url == f"sqlite:///{home}/totalrecall.db"
    assert s.storage_url == str(home / "storage")
    assert s.cache_dir == home / "cache"
    assert s.broker_url is None and s.tasks_in_process
    assert (s.chunk_size, s.model_cache_mb, s.nightly_at) == (64, 2048, "02:00")
    assert s.readonly_password is None and s.aws_endpoint_url is None


def test_default_home_is_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.home == tmp_path / "totalrecall-data"
    assert s.database_url == f"sqlite:///{tmp_path}/totalrecall-data/totalrecall.db"


def test_explicit_values_and_empty_means_unset(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "TOTALRECALL_HOME": str(tmp_path),
            "TOTALRECALL_DATABASE_URL": "postgresql+psycopg2://u:p@db:5432/tr",
            "TOTALRECALL_BROKER_URL": "",  # empty: in-process
            "TOTALRECALL_STORAGE_URL": "s3://bucket/prefix",
            "TOTALRECALL_CHUNK_SIZE": "16",
            "TOTALRECALL_CACHE_DIR": str(tmp_path / "c"),
            "TOTALRECALL_MODEL_CACHE_MB": "512",
            "TOTALRECALL_NIGHTLY_AT": "7:05",
            "TOTALRECALL_READONLY_PASSWORD": "ro-secret",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:50009",
            "TOTALRECALL_S3_MAX_ATTEMPTS": "3",
        }
    )
    assert s.database_url == "postgresql+psycopg2://u:p@db:5432/tr"
    assert s.broker_url is None
    assert s.storage_url == "s3://bucket/prefix"
    assert (s.chunk_size, s.model_cache_mb, s.s3_max_attempts) == (16, 512, 3)
    assert s.cache_dir == tmp_path / "c"
    assert s.nightly_at == "07:05" and s.nightly_time == (7, 5)
    assert s.readonly_password == "ro-secret"
    assert s.aws_endpoint_url == "http://127.0.0.1:50009"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOTALRECALL_CHUNK_SIZE", "abc"),
        ("TOTALRECALL_CHUNK_SIZE", "0"),
        ("TOTALRECALL_MODEL_CACHE_MB", "-5"),
        ("TOTALRECALL_NIGHTLY_AT", "24:00"),
        ("TOTALRECALL_NIGHTLY_AT", "2am"),
        ("TOTALRECALL_NIGHTLY_AT", "02:60"),
        ("TOTALRECALL_SAVE_MAPS", "some"),
        ("TOTALRECALL_FIT_TIME_LIMIT", str(2**31)),  # overflowed the recovery sweep's timedelta near 8.6e13
        ("TOTALRECALL_DATABASE_URL", "postgresql://tr:secret@db:54x2/tr"),
        ("TOTALRECALL_DATABASE_URL", "not a url"),
        ("TOTALRECALL_DATABASE_URL", "sqlite://"),
        ("TOTALRECALL_DATABASE_URL", "sqlite:///:memory:"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.chunk_size = 1  # type: ignore[misc]


def test_get_settings_is_cached_until_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOTALRECALL_CHUNK_SIZE", "8")
    first = get_settings()
    monkeypatch.setenv("TOTALRECALL_CHUNK_SIZE", "9")
    assert get_settings() is first and first.chunk_size == 8
    reset_settings_cache()
    assert get_settings().chunk_size == 9


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg2://tr:s3cr3t@db:5432/tr", "postgresql+psycopg2://tr:***@db:5432/tr"),
        ("redis://:s3cr3t@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("postgresql://tr@db/tr", "postgresql://tr@db/tr"),
        ("postgresql://tr:p%40ss@db/tr", "postgresql://tr:***@db/tr"),
        ("postgresql://tr:p@ss@db/tr", "postgresql://tr:***@db/tr"),  # unescaped '@' still hidden
        ("postgresql://db/tr?user=tr&password=s3cr3t", "postgresql://db/tr?user=tr&password=***"),
        ("/data/storage", "/data/storage"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_repr_and_redacted_hide_secrets() -> None:
    s = Settings.from_env(
        {
            "TOTALRECALL_DATABASE_URL": "postgresql://tr:db-secret@db/tr",
            "TOTALRECALL_BROKER_URL": "redis://:broker-secret@redis:6379/0",
            "TOTALRECALL_READONLY_PASSWORD": "ro-secret",
        }
    )
    shown = repr(s) + str(s) + repr(s.redacted())
    for secret in ("db-secret", "broker-secret", "ro-secret"):
        assert secret not in shown
    assert "postgresql://tr:***@db/tr" in shown


def test_worker_settings_defaults_and_overrides() -> None:
    s = Settings.from_env({})
    assert s.score_time_limits == (900, 1200) and s.fit_time_limits == (7200, 9000)
    assert s.visibility_timeout == 10800 > s.fit_time_limits[1] and s.download_threads == 8
    s = Settings.from_env({"TOTALRECALL_FIT_SOFT_TIME_LIMIT": "20000", "TOTALRECALL_VISIBILITY_TIMEOUT": "60",
                           "TOTALRECALL_DOWNLOAD_THREADS": "2"})
    assert s.fit_time_limits == (20000, 20060) and s.visibility_timeout == 60 and s.download_threads == 2
    assert Settings.from_env({}).save_maps == "findings"
    assert Settings.from_env({"TOTALRECALL_SAVE_MAPS": "ALL"}).save_maps == "all"
    assert Settings.from_env({}).drift_level == 0.5
    assert Settings.from_env({"TOTALRECALL_DRIFT_LEVEL": "0"}).drift_level == 0.0
    with pytest.raises(SettingsError, match="TOTALRECALL_DRIFT_LEVEL"):
        Settings.from_env({"TOTALRECALL_DRIFT_LEVEL": "-1"})


def test_a_visibility_timeout_below_the_longest_task_is_a_logged_risk() -> None:
    assert Settings.from_env({"TOTALRECALL_BROKER_URL": "redis://r/0"}).risks() == []  # the defaults
    short = Settings.from_env({"TOTALRECALL_BROKER_URL": "redis://r/0", "TOTALRECALL_VISIBILITY_TIMEOUT": "600"})
    (risk,) = short.risks()
    assert "TOTALRECALL_VISIBILITY_TIMEOUT (600 s) is not above the longest task's hard time limit (9000 s)" in risk
    assert Settings.from_env({"TOTALRECALL_VISIBILITY_TIMEOUT": "600"}).risks() == []  # in-process: no broker


def test_storage_and_broker_urls_are_checked_when_read(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({"TOTALRECALL_STORAGE_URL": "data/store"}).storage_url == str(tmp_path / "data/store")
    assert Settings.from_env({"TOTALRECALL_STORAGE_URL": "s3://b/p/"}).storage_url == "s3://b/p/"
    for bad, message in (("gs://b/x", "use s3://BUCKET/PREFIX, file://PATH or a folder"),
                         ("s3://", "names no bucket")):
        with pytest.raises(SettingsError, match=f"TOTALRECALL_STORAGE_URL .*{message}"):
            Settings.from_env({"TOTALRECALL_STORAGE_URL": bad})
    with pytest.raises(SettingsError, match="TOTALRECALL_BROKER_URL 'amqp://u:\\*\\*\\*@mq//': use redis://"):
        Settings.from_env({"TOTALRECALL_BROKER_URL": "amqp://u:secret@mq//"})
    assert Settings.from_env({"TOTALRECALL_BROKER_URL": "rediss://r:6380/0"}).broker_url == "rediss://r:6380/0"


def test_database_url_is_checked_and_a_relative_sqlite_path_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({"TOTALRECALL_FIT_TIME_LIMIT": str(2**31 - 1)}).fit_time_limits[1] == 2**31 - 1
    relative = Settings.from_env({"TOTALRECALL_DATABASE_URL": "sqlite:///data/tr.db?timeout=5"})
    assert relative.database_url == f"sqlite:///{tmp_path}/data/tr.db?timeout=5"
    absolute = f"sqlite:///{tmp_path}/tr.db"
    assert Settings.from_env({"TOTALRECALL_DATABASE_URL": absolute}).database_url == absolute
    pg = "postgresql://tr:secret@db:5432/tr"
    assert Settings.from_env({"TOTALRECALL_DATABASE_URL": pg}).database_url == pg
    for bad in ("postgresql://tr:secret@db:54x2/tr", "postgresql//tr:secret@db/tr"):
        with pytest.raises(SettingsError, match="TOTALRECALL_DATABASE_URL is not a database URL") as refused:
            Settings.from_env({"TOTALRECALL_DATABASE_URL": bad})
        assert "secret" not in str(refused.value)
    assert Settings.from_env({"TOTALRECALL_MAX_IMAGE_BYTES": str(2**32)}).max_image_bytes == 2**32  # 4 GiB TIFFs
    with pytest.raises(SettingsError, match="in-memory SQLite database"):
        Settings.from_env({"TOTALRECALL_DATABASE_URL": "sqlite:///file:tr?mode=memory&uri=true"})


def test_soft_time_limit_must_be_below_the_hard_one() -> None:
    with pytest.raises(SettingsError, match="TOTALRECALL_SCORE_SOFT_TIME_LIMIT"):
        Settings.from_env({"TOTALRECALL_SCORE_SOFT_TIME_LIMIT": "60", "TOTALRECALL_SCORE_TIME_LIMIT": "60"})


def test_redact_text_hides_passwords_of_urls_in_messages() -> None:
    message = ('(psycopg2.OperationalError) connection to postgresql://tr:s3cr3t@db:5432/tr failed; '
               'broker redis://:pw@redis:6379/0; image s3://bucket/a:b/c.png')
    redacted = redact_text(message)
    assert "s3cr3t" not in redacted and ":pw@" not in redacted
    assert "postgresql://tr:***@db:5432/tr" in redacted and "s3://bucket/a:b/c.png" in redacted
