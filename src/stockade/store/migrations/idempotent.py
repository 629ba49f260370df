"""Schema operations that do nothing when their object already exists.

All migrations run in one transaction (``migrate.py``), so a crash leaves the schema as it
was. Databases that older versions of stockade left half-migrated (each statement committed
on its own, then the process was killed) hold some of a migration's objects without its
revision stamp; these operations let that migration run again and finish the job.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def _inspector() -> sa.Inspector:
    return sa.inspect(op.get_bind())


def create_table(name: str, *columns: sa.Column[object]) -> None:
    """``op.create_table`` unless the table exists."""
    if not _inspector().has_table(name):
        op.create_table(name, *columns)


def create_index(name: str, table: str, columns: list[str]) -> None:
    """``op.create_index`` unless an index of that name exists on ``table``."""
    if name not in {ix["name"] for ix in _inspector().get_indexes(table)}:
        op.create_index(name, table, columns)


def add_columns(table: str, *columns: sa.Column[object]) -> None:
    """Add the columns ``table`` does not have yet."""
    have = {c["name"] for c in _inspector().get_columns(table)}
    missing = [c for c in columns if c.name not in have]
    if missing:
        with op.batch_alter_table(table) as batch:
            for column in missing:
                batch.add_column(column)


def create_sqlite_trigger(name: str, definition: str) -> None:
    """``CREATE TRIGGER IF NOT EXISTS name definition`` (SQLite only; PostgreSQL gets its own,
    :func:`create_postgres_trigger`, in the same migration)."""
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {definition}")


def create_postgres_trigger(name: str, table: str, when: str, body: str,
                            condition: str = "") -> None:
    """A trigger ``name`` on ``table`` that runs the PL/pgSQL ``body`` ``when`` (e.g.
    ``BEFORE DELETE``; row-level unless TRUNCATE), only if ``condition`` holds (a row
    trigger's WHEN clause); its function is ``<name>_fn``. Replaces one of that name
    (PostgreSQL only; SQLite gets its own, :func:`create_sqlite_trigger`)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    level = "STATEMENT" if "TRUNCATE" in when else "ROW"
    op.execute(f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS "
               f"$$ BEGIN {body} END $$")
    op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    op.execute(f"CREATE TRIGGER {name} {when} ON {table} FOR EACH {level} "
               f"{f'WHEN ({condition}) ' if condition else ''}EXECUTE FUNCTION {name}_fn()")


def drop_trigger(name: str, table: str) -> None:
    """Remove a trigger made by either function above (and its function on PostgreSQL)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {name}_fn()")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
