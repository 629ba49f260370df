"""Secrets (encrypted), per-job leases, and the trust and ref of each job.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import add_columns, create_index, create_table

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the tables and columns (skipping those that exist, see 0001)."""
    create_table(
        "secrets",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("scope_jobs", sa.String(200), nullable=False),
        sa.Column("scope_labels", sa.Text, nullable=False),
        sa.Column("scope_trust", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    create_table(
        "leases",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("runner_id", sa.String(64), nullable=False),
        sa.Column("secret_name", sa.String(100), nullable=False),
        sa.Column("secret_version", sa.Integer, nullable=False),
        sa.Column("delivery", sa.String(8), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    create_index("ix_leases_job_id", "leases", ["job_id"])
    add_columns("jobs",
                sa.Column("trust", sa.String(16), nullable=False, server_default="trusted"),
                sa.Column("ref", sa.String(200), nullable=False, server_default="local"))


def downgrade() -> None:
    """Remove them."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("ref")
        batch.drop_column("trust")
    op.drop_table("leases")
    op.drop_table("secrets")
