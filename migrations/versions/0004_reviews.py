"""Operator reviews of scored images: one verdict per image and product, shown in `anomaly_history`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READONLY_ROLE = "totalrecall_readonly"
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", BigIntId, primary_key=True),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("image_uri", sa.Text(), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("defect_type", sa.String(200), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewed_by", sa.String(200), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_reviews_product_id_products"),
        sa.UniqueConstraint("product_id", "image_uri", name="uq_reviews_product_id_image_uri"),
        sa.CheckConstraint("label IN ('good', 'defective')", name="ck_reviews_label"),
        sa.CheckConstraint("defect_type IS NULL OR label = 'defective'",
                           name="ck_reviews_defect_type_if_defective"),
    )
    _replace_anomaly_history(with_review=True)


def downgrade() -> None:
    _replace_anomaly_history(with_review=False)
    op.drop_table("reviews")


def _replace_anomaly_history(with_review: bool) -> None:
    """Recreate the anomaly_history view (a view's columns cannot be added in place), with or without the
    review columns, and give the read-only role its SELECT on it again (PostgreSQL). The view's SQL is
    repeated from 0001 on purpose: an applied migration is a frozen snapshot."""
    review = ",\n               rv.label AS review,\n               rv.defect_type" if with_review else ""
    join = ("\n        LEFT JOIN reviews rv ON rv.product_id = r.product_id AND rv.image_uri = r.image_uri"
            if with_review else "")
    op.execute("DROP VIEW IF EXISTS anomaly_history")
    op.execute(
        f"""
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
               r.created_at{review}
        FROM results r
        JOIN products p ON p.id = r.product_id
        JOIN model_versions mv ON mv.id = r.model_version_id{join}
        """
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"""
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                    GRANT SELECT ON anomaly_history TO {READONLY_ROLE};
                END IF;
            END
            $$;
            """
        )
