"""The refs an API token may submit jobs for (a glob, like a secret's scope).

Revision ID: 0006
Revises: 0005

A job's ref decides which secrets its scope admits and is part of its ID token's subject, so a
token that may submit trusted work is bound to the refs it speaks for.
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import add_columns

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Existing tokens keep what they could do ('*')."""
    add_columns("api_tokens", sa.Column("refs", sa.String(200), nullable=False,
                                        server_default="*"))


def downgrade() -> None:
    """Remove the column."""
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("refs")
