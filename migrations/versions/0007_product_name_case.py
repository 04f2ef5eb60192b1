"""Product names are unique regardless of case: a unique index on lower(name).

`add_product` refused a name differing from another only in case by looking first, which two concurrent
calls both pass; the index makes the database refuse the second. A database that already holds such
names cannot take the index: the upgrade names them (rename or remove one, then upgrade again).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_products_lower_name"


def upgrade() -> None:
    if not context.is_offline_mode():
        _refuse_names_differing_in_case()
    op.create_index(INDEX, "products", [sa.text("lower(name)")], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="products")


def _refuse_names_differing_in_case() -> None:
    clashes = op.get_bind().execute(sa.text(
        "SELECT lower(name) FROM products GROUP BY lower(name) HAVING count(*) > 1 ORDER BY 1")).scalars().all()
    if clashes:
        raise RuntimeError(f"product names that differ only in case: {', '.join(clashes)}; rename or remove "
                           "all but one of each (names become storage keys), then upgrade again")
