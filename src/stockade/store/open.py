"""Opening the store that the settings name: the embedded SQLite file, or PostgreSQL.

Backends are chosen by the scheme of ``database_url`` (``STOCKADE_DATABASE_URL``), in one
place; PostgreSQL's module (and psycopg) is imported only when the URL names it.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from stockade.errors import UsageError
from stockade.store.interface import Store

if TYPE_CHECKING:
    from stockade.config import Settings

POSTGRES_SCHEMES = frozenset({"postgresql", "postgresql+psycopg", "postgres"})


def open_store(target: "Settings | str") -> Store:
    """The store of ``target``: settings (their ``database_url``, or when that is empty the
    embedded SQLite database at their ``db_path``) or a URL (``postgresql://...``,
    ``postgresql+psycopg://...``, ``sqlite:////absolute/path`` or an absolute path)."""
    url = target if isinstance(target, str) else target.database_url
    if not url and not isinstance(target, str):
        from stockade.store.sqlite import SqliteStore

        return SqliteStore(target.db_path)
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in POSTGRES_SCHEMES:
        from stockade.store.postgres import PostgresStore

        return PostgresStore(url)
    if not sep or scheme.lower() == "sqlite":
        path = Path(rest[1:] if sep else url)  # sqlite:////abs/path.db, as SQLAlchemy has it
        if not path.is_absolute():
            raise UsageError(f"database_url {_shown(url)} names no absolute SQLite file path",
                             hint="write sqlite:////absolute/path.db, or leave database_url "
                                  "empty for the state directory's own database")
        from stockade.store.sqlite import SqliteStore

        return SqliteStore(path)
    raise UsageError(f"database_url {_shown(url)}: stockade stores its state in PostgreSQL "
                     f"or SQLite, not {_shown(scheme)}",
                     hint="use postgresql://USER:PASSWORD@HOST:PORT/DATABASE, or leave "
                          "database_url (STOCKADE_DATABASE_URL) empty for the embedded SQLite "
                          "database")


def _shown(text: str) -> str:
    """``text`` short and printable, with no password in it."""
    from stockade.text import escape_controls

    scheme, sep, rest = text.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        text = f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"
    return repr(escape_controls(text[:120]))
