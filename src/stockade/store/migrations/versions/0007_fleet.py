"""The fleet: runner agents (enrolment tokens, runners, sessions, spent nonces), attempts with
their outcome, log chunks and blobs uploaded over the API, and per job its attempt budget, a
cancel request and its workspace archive.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from stockade.store import schema
from stockade.store.migrations.idempotent import add_columns, create_table

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TABLES = ("enrol_tokens", "runners", "runner_sessions", "used_nonces", "server_secrets",
           "attempts", "log_chunks", "blobs")


def upgrade() -> None:
    """New tables as in ``schema``; jobs of before run once (max_attempts 1)."""
    add_columns("jobs",
                sa.Column("max_attempts", sa.Integer, nullable=False, server_default="1"),
                sa.Column("cancel_requested_at", sa.Float),
                sa.Column("workspace_sha256", sa.String(64)))
    for name in _TABLES:
        table = schema.metadata.tables[name]
        create_table(name, *(sa.Column(c.name, c.type, primary_key=c.primary_key,
                                       nullable=c.nullable, server_default=c.server_default)
                             for c in table.columns))
    if "ix_runner_sessions_runner_id" not in {
            ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("runner_sessions")}:
        op.create_index("ix_runner_sessions_runner_id", "runner_sessions", ["runner_id"])


def downgrade() -> None:
    """Remove what the migration added."""
    for name in reversed(_TABLES):
        op.drop_table(name)
    with op.batch_alter_table("jobs") as batch:
        for column in ("workspace_sha256", "cancel_requested_at", "max_attempts"):
            batch.drop_column(column)
