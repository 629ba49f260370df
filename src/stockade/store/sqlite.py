"""The embedded SQLite store (WAL), over the standard library driver for a lean CLI start.

The queries are shared with PostgreSQL (:class:`~stockade.store.sql.SqlStore`); this module
opens and migrates the file, runs each transaction as ``BEGIN IMMEDIATE`` and keeps the copy of
the audit head outside the database (``audit.head``)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.audit import GENESIS, AuditHead, AuditSnapshot, HeadFile
from stockade.errors import StoreError
from stockade.store.fleet import FleetQueries
from stockade.store.sql import HEAD_REVISION, SqlStore

if TYPE_CHECKING:
    from sqlalchemy import Connection

_AWAY = ("restore it from a backup, or move it away so that stockade starts afresh (the moved "
         "file keeps its jobs and audit trail)")


@contextmanager
def _locked(path: Path, wait_s: float) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600); the kernel releases it if we die."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{path} stayed locked for {wait_s:.0f} s",
                                     hint=f"another stockade process holds it; find it with: "
                                          f"fuser -v {path}") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


class SqliteStore(SqlStore, FleetQueries):
    """A :class:`~stockade.store.interface.Store` in one SQLite file."""

    _skip_locked = ""  # writes are serialised: BEGIN IMMEDIATE
    _damaged_hint = _AWAY

    def __init__(self, path: Path) -> None:
        self.path = path
        self._where = str(path)
        self.audit_head = HeadFile(path.with_name("audit.head"))  # the copy outside the file
        self._lock_path = path.with_name(path.name + ".lock")
        self._moved: tuple[AuditHead, AuditHead] | None = None  # the audit head in this tx
        self._writers: int | None = None  # the writers' lock file (see _turn)
        try:
            if not path.exists():  # private from its first byte
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # shared by the runner's threads (token refresh); every use holds self._lock
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._lock = threading.RLock()
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._migrate_if_behind()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _error(self, e: sqlite3.Error) -> StoreError:
        """``e`` for a person: which file, what is wrong with it, and what to do."""
        text = str(e)
        if "not a database" in text:
            return StoreError(f"{self.path} is not a SQLite database ({text})", hint=_AWAY)
        if any(s in text for s in ("no such table", "no such column", "malformed")):
            return StoreError(f"the state database {self.path} is damaged ({text})", hint=_AWAY)
        return StoreError(f"state database error in {self.path}: {text}",
                          hint="check the file, its permissions and the free space left")

    def _revision(self) -> str | None:
        try:
            rows = self._db.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return None
        return str(rows[0][0]) if rows else None

    def _migrate_if_behind(self) -> None:
        """At the newest schema (the common case) this is one SELECT. Otherwise whichever
        process takes the lock file first migrates, in one transaction; the others wait and
        find it done. A process killed while migrating changed nothing, and freed the lock."""
        if self._revision() == HEAD_REVISION:
            return
        with _locked(self._lock_path, wait_s=120):
            revision = self._revision()
            if revision != HEAD_REVISION:
                if revision is None:  # a new trail: an earlier one's head is kept, not matched
                    self.audit_head.retire()
                self._migrate()
            self._db.execute("PRAGMA journal_mode = WAL")  # while no other process uses it

    def _migrate(self) -> None:
        from stockade.store.migrate import upgrade

        try:
            upgrade(self.path, before_commit=self._anchor_audit_head)
        except StoreError:
            raise
        except Exception as e:  # Alembic and SQLAlchemy raise many types; translate all
            cause = str(getattr(e, "orig", None) or e).splitlines()[0]
            raise StoreError(f"cannot migrate the state database {self.path}: {cause}",
                             hint=_AWAY) from e

    def _anchor_audit_head(self, conn: Connection) -> None:
        """In the migration's transaction: give a trail without a head file (a new database,
        or one from before migration 0004) its file. Before the commit, so that no crash
        leaves a migrated database without it (the migration adds no events: it holds either
        way)."""
        row = conn.exec_driver_sql("SELECT count, hash FROM audit_head WHERE id = 1").first()
        if row is not None:
            self.audit_head.create(AuditHead(row[0], row[1]))

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write among the stockade processes on this file, in the
        order they asked (SQLite's own wait sleeps 1, 2, 5 ... 100 ms between looks: replicas
        on one file waited up to a second): a writer queues on byte 1 of the writers' lock
        file, then takes byte 0 and leaves the queue, so that a writer that just finished
        queues behind one already waiting. A writer stopped while it holds its turn (SIGSTOP, a
        debugger) holds the others until it goes on or dies; readers never wait for it. The
        turn only orders writers: SQLite's own lock still makes each write exclusive (POSIX
        record locks belong to the process, so two stores of one process share a turn)."""
        fd = self._writers
        if fd is None:
            fd = self._writers = os.open(self.path.with_name(self.path.name + ".writers"),
                                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 1)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)

    @contextmanager
    def _begin(self, head: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock, self._turn():
            self._moved = None
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._error(e) from e
            if self._moved is not None:
                with suppress(OSError):  # the commit stands; the file lags, which verify allows
                    self.audit_head.advance(*self._moved, on_chain=self._on_chain)

    def _translated(self, e: Exception) -> Exception:
        return self._error(e) if isinstance(e, sqlite3.Error) else e

    def _audit_moved(self, before: AuditHead, after: AuditHead) -> None:
        self._moved = (self._moved[0] if self._moved else before, after)

    def _on_chain(self, head: AuditHead) -> bool:
        """Whether the trail's event number ``head.events`` has hash ``head.hash``."""
        if head.events == 0:
            return head.hash == GENESIS
        # seq is the position: the table is append-only (triggers), so rowids have no gaps
        try:
            rows = self._db.execute("SELECT hash FROM audit_events WHERE seq = ?",
                                    (head.events,)).fetchall()
        except sqlite3.Error:
            return False
        return bool(rows) and rows[0][0] == head.hash

    def _fetch(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise self._error(e) from e

    def read_blob(self, sha256: str, offset: int, size: int) -> bytes | None:
        """A slice of a blob by SQLite's incremental blob I/O (``substr`` of a blob reads
        all of it, for each slice)."""
        with self._lock:
            try:
                row = self._db.execute("SELECT rowid FROM blobs WHERE sha256 = ?",
                                       (sha256,)).fetchone()
                if row is None:
                    return None
                with self._db.blobopen("blobs", "data", row[0], readonly=True) as blob:
                    blob.seek(min(offset, len(blob)))
                    return blob.read(size)
            except sqlite3.Error as e:
                raise self._error(e) from e

    def audit_snapshot(self) -> AuditSnapshot:
        """The whole trail and both heads, read so that they agree unless someone tampered:
        the file first (it is written after each commit, so it can only be behind what is read
        next), then the events and the head record in one read transaction."""
        try:
            file_head, problem = self.audit_head.read(), ""
        except ValueError as e:
            file_head, problem = None, str(e)
        except OSError as e:
            file_head, problem = None, f"{self.audit_head.path} cannot be read: {e.strerror}"
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    records = self.audit_records()
                    row = self._db.execute("SELECT count, hash FROM audit_head WHERE id = 1"
                                           ).fetchone()
                except sqlite3.OperationalError as e:
                    if "no such table: audit_head" not in str(e):
                        raise
                    row = None  # the table itself was dropped: that is what verify reports
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._error(e) from e
        return AuditSnapshot(records, AuditHead(row[0], row[1]) if row else None, file_head,
                             problem)

    def close(self) -> None:
        """Close the connection (and the writers' lock file)."""
        self._db.close()
        if self._writers is not None:
            os.close(self._writers)
            self._writers = None
