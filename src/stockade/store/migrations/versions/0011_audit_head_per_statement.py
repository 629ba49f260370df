"""On PostgreSQL the audit head moves once per statement that appends events, not once per
event: a statement-level trigger over the inserted rows (a transition table) adds their number
and takes the last one's hash. Per event, the head row got a new version each time (a batch's
twenty events, twenty versions for every later read of the head to pass over) and a PL/pgSQL
call. The head still moves only with the trail: an update of it outside a trigger is refused
(before, one moving the count by exactly one was let through), as is one that does not move
it forward. SQLite keeps its row trigger (one process, no versions).

Revision ID: 0011
Revises: 0010
"""

from alembic import op

from stockade.store.migrations.idempotent import create_postgres_trigger

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_REFUSE = "RAISE EXCEPTION 'audit_head moves only with audit_events';"


def upgrade() -> None:
    """Replace the row trigger that moves the head, and its guard (PostgreSQL only)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE OR REPLACE FUNCTION audit_events_move_head_fn() RETURNS trigger "
               "LANGUAGE plpgsql AS $$ BEGIN UPDATE audit_head SET count = count + (SELECT "
               "count(*) FROM appended), hash = (SELECT hash FROM appended ORDER BY seq DESC "
               "LIMIT 1) WHERE id = 1 AND EXISTS (SELECT 1 FROM appended); RETURN NULL; END $$")
    op.execute("DROP TRIGGER IF EXISTS audit_events_move_head ON audit_events")
    op.execute("CREATE TRIGGER audit_events_move_head AFTER INSERT ON audit_events "
               "REFERENCING NEW TABLE AS appended FOR EACH STATEMENT "
               "EXECUTE FUNCTION audit_events_move_head_fn()")
    create_postgres_trigger("audit_head_only_forward", "audit_head", "BEFORE UPDATE", _REFUSE,
                            condition="pg_trigger_depth() < 1 OR NEW.count <= OLD.count")


def downgrade() -> None:
    """The row trigger of migration 0004 again."""
    if op.get_bind().dialect.name != "postgresql":
        return
    create_postgres_trigger(
        "audit_events_move_head", "audit_events", "AFTER INSERT",
        "UPDATE audit_head SET count = count + 1, hash = NEW.hash WHERE id = 1; RETURN NEW;")
    create_postgres_trigger("audit_head_only_forward", "audit_head", "BEFORE UPDATE", _REFUSE,
                            condition="NEW.count <> OLD.count + 1")
