"""API tokens of ``stockade server``: a role, the highest trust it may submit at, and only a
hash of the secret part.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import create_table

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """The tokens table (the token itself is never stored)."""
    create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("max_trust", sa.String(16), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
    )


def downgrade() -> None:
    """Remove the table."""
    op.drop_table("api_tokens")
