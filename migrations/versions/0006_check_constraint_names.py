"""Check constraints get the names the models give them.

0001 and 0004 passed whole names (`ck_jobs_counts`) to a metadata whose naming convention prefixes them
again, so the databases they built call them `ck_jobs_ck_jobs_counts` while the models say
`ck_jobs_counts`; a later migration dropping one by its model name would fail. PostgreSQL renames them;
SQLite keeps a CHECK constraint's name only in the table's stored CREATE TABLE text, which is edited in
place (SQLite's documented procedure for schema changes that leave the stored rows as they are: writable
schema, schema version bumped, database checked).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    "model_versions": ("status", "active_is_ready"),
    "jobs": ("kind", "status", "counts"),
    "results": ("status",),
    "reviews": ("label", "defect_type_if_defective"),
}


def _doubled(table: str, name: str) -> str:
    return f"ck_{table}_ck_{table}_{name}"


def _intended(table: str, name: str) -> str:
    return f"ck_{table}_{name}"


def upgrade() -> None:
    _rename(_doubled, _intended)


def downgrade() -> None:
    _rename(_intended, _doubled)


def _rename(old: Callable[[str, str], str], new: Callable[[str, str], str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _rename_sqlite(bind, old, new)
        return
    for table, names in CHECKS.items():
        for name in names:
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {old(table, name)} TO {new(table, name)}")


def _rename_sqlite(bind: sa.Connection, old: Callable[[str, str], str], new: Callable[[str, str], str]) -> None:
    if context.is_offline_mode():
        raise RuntimeError("revision 0006 reads the stored table definitions: run it online on SQLite")
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        for table, names in CHECKS.items():
            sql = bind.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"),
                               {"t": table}).scalar_one()
            for name in names:
                before, after = f"CONSTRAINT {old(table, name)} CHECK", f"CONSTRAINT {new(table, name)} CHECK"
                if sql.count(before) != 1:
                    raise RuntimeError(f"table {table}: expected one constraint {old(table, name)}")
                sql = sql.replace(before, after)
            bind.execute(sa.text("UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = :t"),
                         {"sql": sql, "t": table})
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = RESET")  # off, and this connection rereads the schema
    # Any DDL bumps the schema version, so the database's other connections reread the schema too.
    bind.exec_driver_sql("CREATE TABLE totalrecall_schema_bump (x INTEGER)")
    bind.exec_driver_sql("DROP TABLE totalrecall_schema_bump")
    problems = bind.exec_driver_sql("PRAGMA quick_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"database check after renaming check constraints: {problems}")
