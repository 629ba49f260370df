"""Bringing a database to the newest schema (imported only when the schema is behind).

Every pending migration runs in one transaction that takes SQLite's write lock before it reads
anything (``BEGIN IMMEDIATE``): a process killed half-way leaves the schema as it was, and the
next command starts over. The standard library driver would commit each DDL statement on its
own (its legacy transaction control begins transactions only before DML), so the engine here
hands transaction control to SQLAlchemy. The migrations also skip what exists
(``migrations/idempotent.py``), which repairs databases that older versions left half-done.
The caller holds a lock file as well, so that concurrent first runs wait for each other
instead of each importing and starting the migrations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
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
    engine = transactional_engine(URL.create("sqlite", database=str(path)))
    try:
        with engine.connect() as conn, conn.begin():
            cfg = _config()
            _refuse_foreign(conn, path, cfg)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            if before_commit is not None:
                before_commit(conn)
    finally:
        engine.dispose()


def _refuse_foreign(conn: Connection, path: Path, cfg: Config) -> None:
    """A StoreError unless the database is empty, stockade's, or a half-migrated stockade one."""
    tables = {name for (name,) in conn.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    revision = None
    if "alembic_version" in tables:
        revision = conn.exec_driver_sql("SELECT max(version_num) FROM alembic_version").scalar()
    if revision is not None:
        known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
        if revision not in known:
            raise StoreError(
                f"the state database {path} has schema revision {_shown(revision)}, which "
                "this version of stockade does not know",
                hint="it was written by a newer stockade (run that one) or by another "
                     "program: point STOCKADE_HOME elsewhere, or move the file away to start "
                     "afresh")
        return
    foreign = sorted(tables - set(metadata.tables) - {"alembic_version", "sqlite_sequence"})
    if foreign:
        raise StoreError(
            f"{path} is not a stockade database (it holds the tables "
            f"{', '.join(map(_shown, foreign[:5]))}{', ...' if len(foreign) > 5 else ''})",
            hint="point STOCKADE_HOME at stockade's own state directory, or move the file "
                 "away so that stockade starts afresh")


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
