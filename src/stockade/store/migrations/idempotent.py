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
    """``CREATE TRIGGER IF NOT EXISTS name definition`` (SQLite only; other databases get
    their own triggers in their own migration)."""
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {definition}")
