"""Secret scopes bind on the job's ref: ``secrets.scope_refs`` (existing secrets get ``*``).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import add_columns

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the column (unless there, see 0001); every existing secret keeps admitting any ref."""
    add_columns("secrets",
                sa.Column("scope_refs", sa.String(200), nullable=False, server_default="*"))


def downgrade() -> None:
    """Remove it."""
    with op.batch_alter_table("secrets") as batch:
        batch.drop_column("scope_refs")
