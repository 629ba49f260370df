"""Alembic environment: every pending migration in one transaction (see ``migrate.py``).

``migrate.upgrade`` passes its connection, already in the transaction it commits once all
migrations and its own checks are done; the ``alembic`` command line and tests pass a URL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from stockade.store.migrate import transactional_engine
from stockade.store.schema import metadata


def run(connection: Connection) -> None:
    """Run the migrations on ``connection`` inside its transaction."""
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      transactional_ddl=True, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


config = context.config
given = config.attributes.get("connection")
if given is not None:
    run(given)
else:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url must be set by the caller"
    engine = transactional_engine(url)
    with engine.connect() as conn, conn.begin():
        run(conn)
    engine.dispose()
