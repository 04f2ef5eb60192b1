"""A product's region of interest: an image whose white pixels are the part of each image inspected.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("products", sa.Column("roi_uri", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("products", "roi_uri")
