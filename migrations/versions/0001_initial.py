"""Initial schema: products, model_versions, jobs, results; reporting views; read-only role (PostgreSQL).

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READONLY_ROLE = "totalrecall_readonly"
VIEWS = ("anomaly_history", "job_summary")

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def _created_at() -> sa.Column:
    return sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("train_uri", sa.Text(), nullable=False),
        sa.Column("archive_uri_template", sa.Text(), nullable=False),
        sa.Column("fit_config", JSONType, nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_products"),
        sa.UniqueConstraint("name", name="uq_products_name"),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("config", JSONType, nullable=False),
        sa.Column("image_threshold", sa.Float(), nullable=True),
        sa.Column("pixel_threshold", sa.Float(), nullable=True),
        sa.Column("train_image_count", sa.Integer(), nullable=True),
        sa.Column("validation", JSONType, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default=sa.false(), nullable=False),
        _created_at(),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name="fk_model_versions_product_id_products"
        ),
        sa.UniqueConstraint("product_id", "version", name="uq_model_versions_product_id_version"),
        sa.CheckConstraint("status IN ('training', 'ready', 'failed')", name="ck_model_versions_status"),
        sa.CheckConstraint("NOT is_active OR status = 'ready'", name="ck_model_versions_active_is_ready"),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["product_id"],
        unique=True,
        postgresql_where=sa.text("is_active"),
        sqlite_where=sa.text("is_active"),
    )

    op.create_table(
        "jobs",
        sa.Column("id", BigIntId, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("images_uri", sa.Text(), nullable=True),
        sa.Column("run_date", sa.Date(), nullable=True),
        _created_at(),
        sa.Column("started_at", Timestamp, nullable=True),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("enqueued_by", sa.String(200), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_jobs_product_id_products"),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name="fk_jobs_model_version_id_model_versions"
        ),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
        sa.CheckConstraint("kind IN ('fit', 'score')", name="ck_jobs_kind"),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed')", name="ck_jobs_status"),
        sa.CheckConstraint("total >= 0 AND done >= 0 AND failed >= 0", name="ck_jobs_counts"),
    )
    op.create_index("ix_jobs_product_id_created_at", "jobs", ["product_id", "created_at"])
    op.create_index("ix_jobs_status", "jobs", ["status"])

    op.create_table(
        "results",
        sa.Column("id", BigIntId, primary_key=True),
        sa.Column("job_id", BigIntId, nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("image_uri", sa.Text(), nullable=False),
        sa.Column("captured_date", sa.Date(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("is_anomalous", sa.Boolean(), nullable=True),
        sa.Column("mask_uri", sa.Text(), nullable=True),
        sa.Column("heatmap_uri", sa.Text(), nullable=True),
        sa.Column("defect_fraction", sa.Float(), nullable=True),
        sa.Column("max_y", sa.Integer(), nullable=True),
        sa.Column("max_x", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_results_job_id_jobs"),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name="fk_results_model_version_id_model_versions"
        ),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_results_product_id_products"),
        sa.UniqueConstraint("image_uri", "model_version_id", name="uq_results_image_uri_model_version_id"),
        sa.CheckConstraint("status IN ('ok', 'failed')", name="ck_results_status"),
    )
    op.create_index("ix_results_product_id_captured_date", "results", ["product_id", "captured_date"])
    op.create_index("ix_results_job_id", "results", ["job_id"])

    _create_views(op.get_bind().dialect.name)
    if op.get_bind().dialect.name == "postgresql":
        _create_readonly_role()


def _create_views(dialect: str) -> None:
    if dialect == "postgresql":
        def seconds(a: str, b: str) -> str:
            return f"CAST(EXTRACT(EPOCH FROM ({b} - {a})) AS DOUBLE PRECISION)"
    else:
        def seconds(a: str, b: str) -> str:
            return f"(julianday({b}) - julianday({a})) * 86400.0"

    op.execute(
        """
        CREATE VIEW anomaly_history AS
        SELECT p.name AS product,
               r.captured_date,
               r.image_uri,
               r.score,
               r.threshold,
               CASE WHEN r.status = 'failed' THEN 'failed'
                    WHEN r.is_anomalous THEN 'anomalous'
                    ELSE 'ok' END AS verdict,
               mv.version AS model_version,
               r.mask_uri,
               r.error,
               r.job_id,
               r.created_at
        FROM results r
        JOIN products p ON p.id = r.product_id
        JOIN model_versions mv ON mv.id = r.model_version_id
        """
    )
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
               j.error
        FROM jobs j
        JOIN products p ON p.id = j.product_id
        LEFT JOIN model_versions mv ON mv.id = j.model_version_id
        """
    )


def _create_readonly_role() -> None:
    """NOLOGIN role that may SELECT the views only (they read the tables with their owner's rights).

    Roles are cluster-wide: creation tolerates an existing role (also one created concurrently by a
    migration of another database) and a migrating user without CREATEROLE (then a warning, no grants).
    `common.migrate.create_readonly_login` turns it into a login with a password.
    """
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                BEGIN
                    CREATE ROLE {READONLY_ROLE} NOLOGIN;
                EXCEPTION
                    WHEN duplicate_object OR unique_violation THEN NULL;
                    WHEN insufficient_privilege THEN
                        RAISE WARNING 'cannot create role {READONLY_ROLE} (no CREATEROLE): '
                                      'read-only access skipped';
                END;
            END IF;
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                EXECUTE format('GRANT USAGE ON SCHEMA %I TO {READONLY_ROLE}', current_schema());
                GRANT SELECT ON anomaly_history, job_summary TO {READONLY_ROLE};
            END IF;
        END
        $$;
        """
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # The role is cluster-wide and may serve other databases: only this database's grants go.
        op.execute(
            f"""
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                    EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM {READONLY_ROLE}', current_schema());
                END IF;
            END
            $$;
            """
        )
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("results")
    op.drop_table("jobs")
    op.drop_index("uq_model_versions_one_active", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("products")
