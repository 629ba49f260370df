"""A completion that also claimed the runner's next job remembers which (job and attempt), so
that the same completion sent again (its answer was lost on the way) hands the runner that job
again instead of leaving it claimed by nobody who knows.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import add_columns

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Two nullable columns on attempts."""
    add_columns("attempts", sa.Column("next_job_id", sa.String(32)),
                sa.Column("next_attempt", sa.Integer))


def downgrade() -> None:
    """Remove them."""
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("next_attempt")
        batch.drop_column("next_job_id")
