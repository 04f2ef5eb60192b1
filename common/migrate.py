"""Schema migrations, run programmatically (`totalrecall db upgrade`, `totalrecall demo`, tests).

The Alembic environment ships inside the `migrations` package, so this works from an installed wheel as
well as from a checkout.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import migrations
from common.db import READONLY_ROLE, make_engine
from common.settings import get_settings

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """Alembic config for `url` (default: settings' database URL); leaves the caller's logging alone."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["url"] = url or get_settings().database_url  # not via the ini: '%' would break it
    config.attributes["skip_logging_config"] = True
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision` (idempotent; concurrent runs serialise on PostgreSQL)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine = make_engine(url or get_settings().database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def create_readonly_login(url: str | None, password: str, role: str = READONLY_ROLE) -> None:
    """Let the read-only role log in with `password` (PostgreSQL only; run `upgrade` first).

    The password is hashed client-side (SCRAM-SHA-256) so it never appears in SQL text or server logs.
    Needs a user with CREATEROLE (or a superuser).
    """
    if not password:
        raise ValueError("a non-empty password is required for the read-only login")
    engine = make_engine(url or get_settings().database_url, poolclass=NullPool)
    if engine.dialect.name != "postgresql":
        engine.dispose()
        raise NotImplementedError(f"read-only logins exist on PostgreSQL only, not {engine.dialect.name}")
    from psycopg2 import sql
    from psycopg2.extensions import encrypt_password

    try:
        with engine.begin() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}
            ).first()
            if not exists:
                raise LookupError(f"role {role!r} does not exist: run the migrations first")
            raw = connection.connection.dbapi_connection
            hashed = encrypt_password(password, role, raw, "scram-sha-256")
            with raw.cursor() as cursor:
                cursor.execute(
                    sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(hashed)
                    )
                )
    finally:
        engine.dispose()


def readonly_url(url: str, password: str, role: str = READONLY_ROLE) -> str:
    """`url` with the read-only role's credentials (for dashboards); keep it out of logs."""
    return make_url(url).set(username=role, password=password).render_as_string(hide_password=False)
