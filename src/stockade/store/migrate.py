"""Bringing a database to the newest schema (imported only when the schema is behind).

Every pending migration runs in one transaction: a process killed half-way leaves the schema as
it was, and the next start begins again. On SQLite that transaction takes the write lock before
it reads anything (``BEGIN IMMEDIATE``); the standard library driver would commit each DDL
statement on its own (its legacy transaction control begins transactions only before DML), so
the engine here hands transaction control to SQLAlchemy. The migrations also skip what exists
(``migrations/idempotent.py``), which repairs databases that older versions left half-done.
The caller holds a lock file as well, so that concurrent first runs wait for each other
instead of each importing and starting the migrations.

On PostgreSQL (transactional DDL) the transaction first takes an advisory lock of the
database, so replicas started at once take turns: the first migrates, the others find the
newest revision once it has committed and do nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, NullPool, create_engine, event
from sqlalchemy.engine import URL

from stockade.errors import StoreError
from stockade.store.schema import metadata


def _config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "stockade.store:migrations")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def transactional_engine(url: str | URL) -> Engine:
    """An engine whose transactions enclose DDL too; on SQLite each begins ``IMMEDIATE``."""
    engine = create_engine(url)
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout = 30000")

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(path: Path, before_commit: Callable[[Connection], None] | None = None) -> None:
    """Bring the SQLite database at ``path`` to the newest schema in one transaction, then
    call ``before_commit`` with the connection while that transaction is still open.

    Refuses (``StoreError``) a database that is not stockade's or is newer than this code.
    """
    _upgrade(transactional_engine(URL.create("sqlite", database=str(path))), str(path),
             before_commit)


# pg_advisory_xact_lock's key for migrations (any constant that stockade uses for nothing else)
MIGRATION_LOCK = 0x73746B6D6967


def upgrade_postgres(connect: Callable[[], Any], where: str) -> None:
    """Bring the PostgreSQL database that ``connect()`` (a new DBAPI connection) opens to the
    newest schema in one transaction, under the migration lock; ``where`` names it in errors.

    Refuses (``StoreError``) a database that holds other tables or is newer than this code.
    """
    _upgrade(create_engine("postgresql+psycopg://", creator=connect, poolclass=NullPool), where)


def _upgrade(engine: Engine, where: str,
             before_commit: Callable[[Connection], None] | None = None) -> None:
    try:
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":  # replicas starting at once take turns
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            cfg = _config()
            _refuse_foreign(conn, where, cfg)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            if before_commit is not None:
                before_commit(conn)
    finally:
        engine.dispose()


def _tables(conn: Connection) -> set[str]:
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    return {name for (name,) in conn.exec_driver_sql(sql)}


def _refuse_foreign(conn: Connection, where: str, cfg: Config) -> None:
    """A StoreError unless the database is empty, stockade's, or a half-migrated stockade one."""
    sqlite = conn.dialect.name == "sqlite"
    tables = _tables(conn)
    revision = None
    if "alembic_version" in tables:
        revision = conn.exec_driver_sql("SELECT max(version_num) FROM alembic_version").scalar()
    if revision is not None:
        known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
        if revision not in known:
            raise StoreError(
                f"the state database {where} has schema revision {_shown(revision)}, which "
                "this version of stockade does not know",
                hint="it was written by a newer stockade (run that one) or by another "
                     "program: point STOCKADE_HOME elsewhere, or move the file away to start "
                     "afresh" if sqlite else
                     "it was written by a newer stockade: run that version (every replica on "
                     "one database runs the same one), or point STOCKADE_DATABASE_URL at "
                     "another database")
        return
    foreign = sorted(tables - set(metadata.tables) - {"alembic_version", "sqlite_sequence"})
    if foreign:
        raise StoreError(
            f"{where} is not a stockade database (it holds the tables "
            f"{', '.join(map(_shown, foreign[:5]))}{', ...' if len(foreign) > 5 else ''})",
            hint="point STOCKADE_HOME at stockade's own state directory, or move the file "
                 "away so that stockade starts afresh" if sqlite else
                 "point STOCKADE_DATABASE_URL at a database of stockade's own (an empty one "
                 "is set up on first use)")


def _shown(name: object) -> str:
    """A name read from the file, short and inert (the file may be anyone's)."""
    from stockade.text import escape_controls

    text = str(name)
    return repr(escape_controls(text[:40]) + ("..." if len(text) > 40 else ""))


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head
