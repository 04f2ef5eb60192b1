"""Labelled validation images per product: a fit with them sets F1-optimal thresholds, or an image
threshold at a false-alarm budget.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("products", sa.Column("validation_uri", sa.Text(), nullable=True))
    op.add_column("products", sa.Column("max_false_alarms", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("products", "max_false_alarms")
    op.drop_column("products", "validation_uri")
