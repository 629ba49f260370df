"""What a runner may be is the admin's call: enrolment tokens carry the labels and the highest
trust of the jobs their runners may take, and runners keep them; each attempt's uploads are
recorded, so that a completion names only artifacts its own attempt sent; the queue is an
index.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import add_columns, create_index, create_table

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Token and runner bounds (runners of before: trusted jobs at most), and the uploads."""
    add_columns("enrol_tokens",
                sa.Column("labels_json", sa.Text, nullable=False, server_default="[]"),
                sa.Column("max_trust", sa.String(16), nullable=False, server_default="trusted"))
    add_columns("runners",
                sa.Column("max_trust", sa.String(16), nullable=False, server_default="trusted"))
    create_table("attempt_uploads",
                 sa.Column("job_id", sa.String(32), primary_key=True),
                 sa.Column("attempt", sa.Integer, primary_key=True),
                 sa.Column("sha256", sa.String(64), primary_key=True))
    # claims read the oldest queued jobs: in index order, never a sort of the whole queue
    create_index("ix_jobs_queue", "jobs", ["status", "created_at", "id"])


def downgrade() -> None:
    """Remove what the migration added."""
    op.drop_index("ix_jobs_queue", "jobs")
    op.drop_table("attempt_uploads")
    with op.batch_alter_table("runners") as batch:
        batch.drop_column("max_trust")
    with op.batch_alter_table("enrol_tokens") as batch:
        batch.drop_column("max_trust")
        batch.drop_column("labels_json")
