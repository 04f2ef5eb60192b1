"""Alembic environment for TotalRecall.

Database URL, first match wins: an open connection in `config.attributes["connection"]`, a URL in
`config.attributes["url"]` (what `common.migrate` passes; avoids configparser's `%` interpolation),
`-x url=...` on the command line, `sqlalchemy.url` in the ini file, then `TOTALRECALL_DATABASE_URL`
through `common.settings`.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.pool import NullPool

from common.db import Base, make_engine
from common.settings import get_settings

config = context.config
target_metadata = Base.metadata

# Arbitrary constant: serialises concurrent `upgrade` runs against one PostgreSQL database.
_PG_LOCK_ID = 7_405_113_001

if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or get_settings().database_url
    )


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite can only ALTER via table copies
        compare_type=True,
    )


def _migrate(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    # named paramstyle: with psycopg2's default (pyformat) the emitted SQL would have every '%' doubled
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = make_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _migrate(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
