"""The head of the audit chain (event count and last hash), kept with every appended event.

Revision ID: 0004
Revises: 0003

A removed tail leaves a shorter chain that still verifies; the head record, moved by a trigger
in the same transaction as each insert, says how long the chain must be. Existing trails get
their current head.
"""

import sqlalchemy as sa
from alembic import op

from stockade.store.migrations.idempotent import (
    create_postgres_trigger,
    create_sqlite_trigger,
    create_table,
    drop_trigger,
)

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

GENESIS = "0" * 64  # the chain's start (stockade.audit.GENESIS, fixed here like the schema)


def upgrade() -> None:
    """Create the one-row table, fill it from the trail, and keep it moving with the trail."""
    create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("count", sa.Integer().with_variant(sa.BigInteger(), "postgresql"),
                  nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.execute(
        "INSERT INTO audit_head (id, count, hash) SELECT 1, (SELECT COUNT(*) FROM audit_events), "
        f"COALESCE((SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1), '{GENESIS}') "
        "WHERE NOT EXISTS (SELECT 1 FROM audit_head)"
    )
    create_sqlite_trigger(
        "audit_events_move_head",
        "AFTER INSERT ON audit_events BEGIN "
        "UPDATE audit_head SET count = count + 1, hash = NEW.hash WHERE id = 1; END",
    )
    create_sqlite_trigger(  # triggers stop mistakes; the copy outside the database stops more
        "audit_head_no_delete",
        "BEFORE DELETE ON audit_head "
        "BEGIN SELECT RAISE(ABORT, 'audit_head moves only with audit_events'); END",
    )
    create_sqlite_trigger(
        "audit_head_only_forward",
        "BEFORE UPDATE ON audit_head WHEN NEW.count != OLD.count + 1 "
        "BEGIN SELECT RAISE(ABORT, 'audit_head moves only with audit_events'); END",
    )
    # the same on PostgreSQL, in PL/pgSQL (TRUNCATE, which SQLite has not, refused too)
    create_postgres_trigger(
        "audit_events_move_head", "audit_events", "AFTER INSERT",
        "UPDATE audit_head SET count = count + 1, hash = NEW.hash WHERE id = 1; RETURN NEW;")
    refuse = "RAISE EXCEPTION 'audit_head moves only with audit_events';"
    create_postgres_trigger("audit_head_no_delete", "audit_head", "BEFORE DELETE", refuse)
    create_postgres_trigger("audit_head_no_truncate", "audit_head", "BEFORE TRUNCATE", refuse)
    create_postgres_trigger("audit_head_only_forward", "audit_head", "BEFORE UPDATE", refuse,
                            condition="NEW.count <> OLD.count + 1")


def downgrade() -> None:
    """Remove the table and its triggers."""
    for trigger, table in (("audit_head_only_forward", "audit_head"),
                           ("audit_head_no_truncate", "audit_head"),
                           ("audit_head_no_delete", "audit_head"),
                           ("audit_events_move_head", "audit_events")):
        drop_trigger(trigger, table)
    op.drop_table("audit_head")
