"""Initial schema: jobs, steps, artifacts and the append-only audit trail.

Revision ID: 0001
Revises:

Every step skips what exists (``idempotent``): earlier versions of stockade committed each
statement on its own, and a first run killed among them left some tables without the stamp.
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import (
    create_index,
    create_postgres_trigger,
    create_sqlite_trigger,
    create_table,
    drop_trigger,
)

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# 64 bits on PostgreSQL (BIGINT; BIGSERIAL for a key); on SQLite INTEGER, which is 64 bits
# there and, as the key, the rowid
BIG = sa.Integer().with_variant(sa.BigInteger(), "postgresql")


def upgrade() -> None:
    """Create the tables, and triggers that make audit_events append-only."""
    create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("labels_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.String(32)),
        sa.Column("exit_code", sa.Integer),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("runner_id", sa.String(64)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("result_json", sa.Text),
    )
    create_index("ix_jobs_status", "jobs", ["status"])
    create_index("ix_jobs_created_at", "jobs", ["created_at"])
    create_table(
        "steps",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("duration_s", sa.Float, nullable=False),
    )
    create_table(
        "artifacts",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", BIG, nullable=False),
    )
    create_table(
        "audit_events",
        sa.Column("seq", BIG, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(32)),
        sa.Column("detail_json", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    create_index("ix_audit_events_job_id", "audit_events", ["job_id"])
    for verb in ("UPDATE", "DELETE"):
        create_sqlite_trigger(
            f"audit_events_no_{verb.lower()}",
            f"BEFORE {verb} ON audit_events "
            "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
        )
    for verb in ("UPDATE", "DELETE", "TRUNCATE"):
        create_postgres_trigger(f"audit_events_no_{verb.lower()}", "audit_events",
                                f"BEFORE {verb}",
                                "RAISE EXCEPTION 'audit_events is append-only';")


def downgrade() -> None:
    """Drop everything."""
    for verb in ("update", "delete", "truncate"):
        drop_trigger(f"audit_events_no_{verb}", "audit_events")
    for table in ("audit_events", "artifacts", "steps", "jobs"):
        op.drop_table(table)
