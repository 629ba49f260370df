"""Alembic environment: migrate the database whose URL the caller put in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from stockade.store.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url must be set by the caller"
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
