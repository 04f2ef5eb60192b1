"""Score drift: the nominal median score of each model version, each score job's median score and warning.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READONLY_ROLE = "totalrecall_readonly"


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("nominal_median_score", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("median_score", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("warning", sa.Text(), nullable=True))
    _replace_job_summary(with_drift=True)


def downgrade() -> None:
    _replace_job_summary(with_drift=False)
    op.drop_column("jobs", "warning")
    op.drop_column("jobs", "median_score")
    op.drop_column("model_versions", "nominal_median_score")


def _replace_job_summary(with_drift: bool) -> None:
    """Recreate the job_summary view (a view's columns cannot be added in place), with or without the
    drift columns, and give the read-only role its SELECT on it again (PostgreSQL)."""
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        def seconds(a: str, b: str) -> str:
            return f"CAST(EXTRACT(EPOCH FROM ({b} - {a})) AS DOUBLE PRECISION)"
    else:
        def seconds(a: str, b: str) -> str:
            return f"(julianday({b}) - julianday({a})) * 86400.0"
    drift = ",\n               j.median_score,\n               j.warning" if with_drift else ""
    op.execute("DROP VIEW IF EXISTS job_summary")
    op.execute(
        f"""
        CREATE VIEW job_summary AS
        SELECT j.id AS job_id,
               j.kind,
               p.name AS product,
               j.status,
               j.total,
               j.done,
               j.failed,
               j.run_date,
               mv.version AS model_version,
               j.enqueued_by,
               j.created_at,
               j.started_at,
               j.finished_at,
               {seconds("j.created_at", "j.started_at")} AS queued_seconds,
               {seconds("j.started_at", "j.finished_at")} AS run_seconds,
               j.error{drift}
        FROM jobs j
        JOIN products p ON p.id = j.product_id
        LEFT JOIN model_versions mv ON mv.id = j.model_version_id
        """
    )
    if dialect == "postgresql":
        op.execute(
            f"""
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                    GRANT SELECT ON job_summary TO {READONLY_ROLE};
                END IF;
            END
            $$;
            """
        )
