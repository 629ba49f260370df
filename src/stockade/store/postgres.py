"""The PostgreSQL store, for a fleet: several ``stockade server`` replicas on one database.

psycopg 3 over a connection pool: the server runs requests in many threads, and each one
borrows a connection for one transaction or read (a batch, one for all of it). Transactions
are READ COMMITTED; claims lock their candidates ``FOR UPDATE SKIP LOCKED``, so replicas never
take the same job, and every write transaction (uploads excepted) locks the one ``audit_head``
row before any other, so that the chain stays one chain and no two transactions deadlock (see
:mod:`stockade.store.sql`). The head row is the trail's only
anchor here: ``audit.head``, the copy outside the database, belongs to the embedded SQLite
store of one host.

Imported only when ``database_url`` names PostgreSQL: the embedded path never loads psycopg.
"""

import json
import re
import select
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from stockade.audit import AuditEvent, AuditHead, AuditSnapshot, chain_hash
from stockade.errors import StoreError
from stockade.store.fleet import FleetQueries
from stockade.store.pgsets import SetQueries
from stockade.store.sql import (
    AUDIT_COLUMNS,
    HEAD_REVISION,
    HEAD_SQL,
    Db,
    SqlStore,
    Undone,
    audit_records,
)

SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")
_TUPLES = psycopg.pq.ExecStatus.TUPLES_OK  # a statement's result that has rows
_FAILED = (psycopg.pq.TransactionStatus.INERROR, psycopg.pq.TransactionStatus.UNKNOWN)
POOL_MAX = 16  # connections per store (a replica); the server's max_connections bounds them all
# no bitmap scans, no incremental sorts: with a queue that grew faster than the statistics (a
# burst of submissions), the planner read and sorted every queued job for each claim (2-3 ms
# of the database's CPU each), or walked the jobs in order of creation (the index of the
# jobs' list) past every job claimed since the statistics, filtering on the status (a cost
# growing with each claim), instead of reading the first rows of the queue index; the store's
# queries are small lookups (PostgreSQL 13 brought incremental sorts, and refuses the setting
# before)
_OPTIONS = {0: "-c enable_bitmapscan=off", 130000: "-c enable_incremental_sort=off"}
POOL_WAIT_S = 30.0
# libpq's parameters unless the URL sets them: a connection to a database host that vanished
# without a goodbye (a failover, a reboot, a cut network) fails within seconds instead of
# holding the store's thread, and every request of its server with it: an idle one by TCP
# keepalives (20 s quiet, then 4 probes 5 s apart), one whose statement is not acknowledged
# within 20 s (the kernel's retransmissions would go on for about 15 minutes); a live server
# answers both however long its statement runs (see docs/fleet.md)
_CONNECTION_DEFAULTS = {"connect_timeout": "10", "application_name": "stockade",
                        "keepalives": "1", "keepalives_idle": "20",
                        "keepalives_interval": "5", "keepalives_count": "4",
                        "tcp_user_timeout": "20000"}
_URL_HINT = ("write it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE (see the settings "
             "table in README)")


class PostgresStore(SqlStore, SetQueries, FleetQueries):
    """A :class:`~stockade.store.interface.Store` in a PostgreSQL database; safe to share
    between threads."""

    _skip_locked = " FOR UPDATE SKIP LOCKED"
    _for_update = " FOR UPDATE"
    _like = "ILIKE"  # as SQLite's LIKE: a prefix in capitals finds the job too
    _damaged_hint = "restore the database from a backup, or ask its administrator what changed"

    def __init__(self, url: str, pool_size: int = POOL_MAX) -> None:
        self._conninfo, self._where = _conninfo(url)
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                revision, version = _revision(conn), conn.info.server_version
        except psycopg.ProgrammingError as e:  # a parameter libpq refuses
            raise _invalid(url, e) from e
        except psycopg.Error as e:
            raise self._error(e) from e
        if revision != HEAD_REVISION:
            self._migrate()
        options = _options(self._conninfo, version)
        self._pool = ConnectionPool(self._conninfo, min_size=1, max_size=pool_size,
                                    kwargs={"autocommit": True, "options": options},
                                    timeout=POOL_WAIT_S, check=self._check,
                                    name="stockade", open=True)

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        """The pool's check of a connection before it lends it (raises if it is dead).
        An idle connection the server closed (a restart, ``pg_terminate_backend``) has its
        goodbye waiting on the socket: only then does it cost a round trip (not one for every
        batch, a wait for the database each time); then also every other idle connection is
        checked at once, since a restart closed them all (else the pool found them dead one
        at a time, waiting longer after each: 1, 2, 4 ... s, until its 30 s ran out)."""
        if conn.closed:
            raise psycopg.OperationalError("the connection is closed")
        try:
            said = _readable(conn.fileno())
        except (OSError, ValueError):
            said = True  # (when in doubt, the full check)
        if not said:
            return
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error:
            self._pool.check()
            raise

    @contextmanager
    def _lent(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool for a call or a batch. If it was lost meanwhile (a
        failover or a reboot of the database's host says no goodbye), the pool's idle
        connections are checked at once: only the calls under way fail, not one after
        another on each dead connection lent."""
        with self._pool.connection() as conn:
            try:
                yield conn
            finally:
                if conn.broken:
                    self._pool.check()

    @staticmethod
    def _one_of(column: str, values: list[str]) -> tuple[str, tuple[Any, ...]]:
        return f"{column} = ANY(?::text[])", (list(values),)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo)

    def _migrate(self) -> None:
        from stockade.store.migrate import upgrade_postgres

        try:
            upgrade_postgres(self._connect, self._where)
        except StoreError:
            raise
        except Exception as e:  # Alembic and SQLAlchemy raise many types; translate all
            orig = getattr(e, "orig", None) or e
            if isinstance(orig, psycopg.Error):
                raise self._error(orig) from e
            raise StoreError(f"cannot migrate the database {self._where}: "
                             f"{str(orig).splitlines()[0] if str(orig) else type(orig).__name__}",
                             hint=self._damaged_hint) from e

    def _error(self, e: Exception) -> StoreError:
        """``e`` for a person: which database, what is wrong, and what to do."""
        text = " ".join(str(e).split()) or type(e).__name__
        reason = text.split("FATAL:", 1)[-1].strip()
        info = conninfo_to_dict(self._conninfo)
        if isinstance(e, PoolTimeout):
            return StoreError(f"no connection to the database {self._where} came free within "
                              f"{POOL_WAIT_S:.0f} s",
                              hint="the PostgreSQL server may be down or overloaded: check it "
                                   "(pg_isready) and its log")
        if "password authentication failed" in text or "no password supplied" in text \
                or getattr(e, "sqlstate", None) in ("28P01", "28000"):
            return StoreError(f"PostgreSQL refused the credentials of user "
                              f"{info.get('user', '(default)')} for {self._where}: {reason}",
                              hint="check the user and password in STOCKADE_DATABASE_URL "
                                   "(or PGPASSWORD, ~/.pgpass) and the server's pg_hba.conf")
        if ("database" in text and "does not exist" in text and "FATAL" in text) \
                or getattr(e, "sqlstate", None) == "3D000":
            return StoreError(f"the database {self._where} does not exist",
                              hint=f"create it (createdb -h HOST -p PORT -U USER "
                                   f"{info.get('dbname', 'NAME')}; stockade sets up its "
                                   "tables) or correct STOCKADE_DATABASE_URL")
        state = getattr(e, "sqlstate", None) or ""
        if state.startswith("40"):  # transaction rollback: a deadlock, a serialization failure
            return StoreError(f"the database {self._where} undid a change that conflicted "
                              f"with a concurrent one: {reason}",
                              hint="nothing of it was saved: repeat it")
        if state == "57014":  # query canceled (statement_timeout, pg_cancel_backend)
            return StoreError(f"the database {self._where} canceled a statement: {reason}",
                              hint="nothing of it was saved; check the server's "
                                   "statement_timeout and load, then repeat it")
        if isinstance(e, psycopg.OperationalError) and (
                text.startswith(("connection failed", "connection is bad", "failed to resolve"))
                or "connection refused" in text.lower() or "timeout expired" in text):
            return StoreError(f"cannot reach the PostgreSQL server of {self._where}: "
                              f"{reason.removeprefix('connection failed: ')}",
                              hint="start the server, or correct the host and port in "
                                   "STOCKADE_DATABASE_URL (pg_isready -h HOST -p PORT says "
                                   "whether it accepts connections)")
        if isinstance(e, psycopg.OperationalError):
            return StoreError(f"lost the connection to the database {self._where}: {reason}",
                              hint="check the PostgreSQL server and its log (a change under "
                                   "way may or may not have been committed: look before "
                                   "repeating it)")
        if isinstance(e, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
            return StoreError(f"the state database {self._where} is damaged ({text})",
                              hint=self._damaged_hint)
        return StoreError(f"state database error in {self._where}: {text}",
                          hint="check the PostgreSQL server's log")

    def _translated(self, e: Exception) -> Exception:
        return self._error(e) if isinstance(e, psycopg.Error) else e

    def _append_events(self, db: Db, events: list[AuditEvent]) -> None:
        """Chain ``events`` onto the head this transaction locked (read with the statement
        that locked it: no round trip of its own) and insert them in one statement, as arrays
        (one prepared statement whatever their number); sent with the next statement whose
        result is read, or with the commit."""
        assert isinstance(db, _Db)
        head = db.head()
        if head is None:  # the head row is gone: the base says so, visibly
            super()._append_events(db, events)
            db.forget_head()
            return
        columns: list[list[Any]] = [[] for _ in range(7)]
        count, digest = head
        for event in events:
            prev, digest = digest, chain_hash(digest, event)
            for column, value in zip(columns, (float(event.at), event.actor, event.action,
                                               event.job_id,
                                               json.dumps(event.detail, sort_keys=True),
                                               prev, digest), strict=True):
                column.append(value)
        db.execute(_INSERT_EVENTS, columns)
        db.moved((count + len(events), digest))

    def batched(self, calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """The base's batch on one pooled connection for all of it: its reads before the
        transaction begins run there too (one borrow, one liveness check, per batch)."""
        local = self._local()
        try:
            with self._lent() as conn:
                local.conn = conn
                try:
                    return super().batched(calls)
                finally:
                    local.conn = None
        except psycopg.Error as e:
            raise self._error(e) from e

    @contextmanager
    def _begin(self, head: bool = True) -> Iterator["_Db"]:
        """A transaction that first locks the audit head (unless ``head`` is False): nearly
        every write appends events, so writers take turns there anyway, and none then holds
        a row another waits for while it waits for one (batches and transactions lock the rows
        of runners, jobs and attempts in no set order: they deadlocked). Its statements travel
        in pipeline mode (see :class:`_Db`): while a writer holds the head, its round trips
        are every other writer's wait."""
        try:
            with self._connection() as conn, _transaction(conn, self._error) as db:
                if head:
                    db.lock_head()
                yield db
        except psycopg.Error as e:
            raise self._error(e) from e

    def _fetch(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self._connection() as conn:
                return conn.execute(_pg(sql), args).fetchall()
        except psycopg.Error as e:
            raise self._error(e) from e

    def _connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """The connection of this thread's batch, or one borrowed from the pool (also when
        the batch's was lost, or left in a failed transaction: the calls run again alone run
        on another)."""
        local = self._local()
        conn = getattr(local, "conn", None)
        if conn is not None and not conn.closed and conn.info.transaction_status not in _FAILED:
            return nullcontext(conn)
        local.conn = None
        return self._lent()

    def audit_snapshot(self) -> AuditSnapshot:
        """The whole trail and its head record, read in one snapshot (no file: the head row
        is the anchor on PostgreSQL, so ``file_head`` is None and ``file_problem`` empty)."""
        try:
            with self._lent() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                records = audit_records(conn.execute(
                    f"SELECT {AUDIT_COLUMNS} FROM audit_events ORDER BY seq").fetchall())
                row = None
                if conn.execute("SELECT to_regclass('audit_head')").fetchone() != (None,):
                    row = conn.execute(HEAD_SQL).fetchone()
        except psycopg.Error as e:
            raise self._error(e) from e
        return AuditSnapshot(records, AuditHead(row[0], row[1]) if row else None, None, "")

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()


@contextmanager
def _transaction(conn: psycopg.Connection[Any], error: Callable[[Exception], StoreError]
                 ) -> Iterator["_Db"]:
    """One transaction on ``conn`` (in autocommit mode) in pipeline mode: BEGIN goes with the
    first statement whose result is read, COMMIT with the statements still unread at the end,
    in one round trip (the pipeline's last sync). Undone if the block raises. A statement
    that fails there fails the commit: :class:`~stockade.store.sql.Undone` when the server
    said why (nothing of the transaction stands), also when the block caught a statement's
    error and went on (the server then answers COMMIT by undoing it all); a lost connection
    stays a plain error (the commit may have happened). The connection is left outside any
    transaction whenever it is still up; when a statement of the transaction failed, what
    psycopg knows of the connection's prepared statements is forgotten (see
    :func:`_forget_prepared`)."""
    committing = failed = False
    db: _Db | None = None
    try:
        with conn.pipeline() as pipeline:
            db = _Db(conn, pipeline, error)
            try:
                yield db
            except BaseException:
                try:  # out of an aborted pipeline (its error is known)
                    pipeline.sync()
                except psycopg.Error:
                    failed = True
                with suppress(psycopg.Error):  # sent at the pipeline's end (a lost connection)
                    conn.execute("ROLLBACK")
                raise
            committing = True
            commit = db.commit()
    except psycopg.Error as e:
        failed = True
        if not committing:
            raise
        _leave(conn)  # what the failed statement left: COMMIT did not run
        if conn.broken or not getattr(e, "sqlstate", None):
            raise
        undone = error(e)
        raise Undone(undone.message, hint=undone.hint) from e
    finally:
        if failed or (db is not None and db.failed):
            _forget_prepared(conn)
    if commit.statusmessage != "COMMIT":
        raise Undone(f"the database undid a transaction ({commit.statusmessage}): one of its "
                     "statements failed, and the code that ran it went on",
                     hint="nothing of it was saved: repeat it")


def _readable(fd: int) -> bool:
    """Whether ``fd`` has something to read (or its peer closed it), without waiting (poll,
    not select: a descriptor may be above select's 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _forget_prepared(conn: psycopg.Connection[Any]) -> None:
    """After a transaction whose pipeline a failed statement aborted: the database skipped
    the rest of it, also the preparation of a statement psycopg (3.3) prepares there (past its
    threshold) and takes for prepared all the same, so that every later transaction running
    it on the connection would fail ('prepared statement "_pg3_N" does not exist'). psycopg's
    record of prepared statements is cleared (with its next statement it deallocates them all
    on the server, as after a DISCARD ALL); a psycopg without that record: the connection is
    closed, and the pool replaces it."""
    prepared = getattr(conn, "_prepared", None)
    if callable(getattr(prepared, "clear", None)):
        prepared.clear()  # type: ignore[union-attr]
    else:
        conn.close()


def _leave(conn: psycopg.Connection[Any]) -> None:
    """End the transaction ``conn`` may still be in (unless the connection is gone)."""
    if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with suppress(psycopg.Error):
            conn.execute("ROLLBACK")


class _Db:
    """A pooled connection in a transaction in pipeline mode, taking ``?`` placeholders (see
    ``sql.Db``). A statement is sent at once, but its result is waited for only when read
    (rows, or the count of rows changed): statements nobody reads (inserts, the head's lock)
    travel with the next read, or with the commit. Statements share a cursor while their
    results are read in turn (a cursor each costs a third of a statement's client CPU); one
    sent while the last result is unread gets a new one. An error of a statement not read is
    raised by a later read or by the commit: the transaction fails whole either way."""

    __slots__ = ("_conn", "_cur", "_error", "_head", "_last", "failed", "pipeline")

    def __init__(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline,
                 error: Callable[[Exception], StoreError]) -> None:
        self._conn, self.pipeline, self._error = conn, pipeline, error
        self.failed = False  # whether a statement failed (the pipeline was aborted)
        self._cur = conn.cursor()
        self._cur.execute("BEGIN")  # (nobody reads its result: the next statement replaces it)
        self._last: _Result | None = None
        self._head: Any = _UNLOCKED  # the head row: a _Result until read, a tuple, or None

    def execute(self, sql: str, args: Any = (), /) -> "_Result":
        """Send one statement."""
        cur = self._cursor()
        try:
            cur.execute(_pg(sql), args)
        except psycopg.Error as e:
            raise self.error(e) from e
        self._last = _Result(self, cur)
        return self._last

    def executemany(self, sql: str, seq: Iterable[Any], /) -> "_Result":
        """Send one statement for each argument tuple."""
        cur = self._cursor()
        try:
            cur.executemany(_pg(sql), seq)
        except psycopg.Error as e:
            raise self.error(e) from e
        self._last = _Result(self, cur, many=True)
        return self._last

    def error(self, e: psycopg.Error) -> StoreError:
        """``e`` for a person; the transaction failed."""
        self.failed = True
        return self._error(e)

    def _cursor(self) -> psycopg.Cursor[Any]:
        """The cursor of the next statement: the last one's, unless its result was not read
        yet (it may be: the result keeps that cursor, the next statement gets a new one)."""
        if self._last is not None and not self._last.settled:
            self._cur = self._conn.cursor()
        return self._cur

    def commit(self) -> psycopg.Cursor[Any]:
        """Send COMMIT, on the cursor returned (what it raises is the driver's, for
        :func:`_transaction` to judge)."""
        cur = self._cursor()
        cur.execute("COMMIT")
        return cur

    def lock_head(self) -> None:
        """Lock the audit head row (its result read when events are appended)."""
        self._head = self.execute(HEAD_SQL + " FOR UPDATE")

    def head(self) -> tuple[int, str] | None:
        """The audit head as this transaction left it, locked (None if the row is gone)."""
        if self._head is _UNLOCKED:
            self.lock_head()
        if isinstance(self._head, _Result):
            row = self._head.fetchone()
            self._head = (int(row[0]), str(row[1])) if row is not None else None
        head: tuple[int, str] | None = self._head
        return head

    def moved(self, head: tuple[int, str]) -> None:
        """This transaction appended events: the head is now ``head``."""
        self._head = head

    def forget_head(self) -> None:
        """The head moved in a way not known here: read it again when it is needed."""
        self._head = _UNLOCKED


_UNLOCKED = object()  # a transaction that has not locked the audit head (yet)


class _Result:
    """A statement's outcome (``sql.Cursor``): the rows it changed, the rows it returned,
    waited for when first read (the statements sent before it come back with it)."""

    __slots__ = ("_cur", "_db", "_many", "_next", "_rowcount", "_rows")

    def __init__(self, db: _Db, cur: psycopg.Cursor[Any], many: bool = False) -> None:
        self._db, self._cur, self._many = db, cur, many
        self._rows: list[Any] | None = None
        self._rowcount, self._next = -1, 0

    @property
    def settled(self) -> bool:
        """Whether the result was read (its cursor is free for another statement)."""
        return self._rows is not None

    def _settled(self) -> list[Any]:
        if self._rows is None:
            cur = self._cur
            try:
                if self._many or cur.pgresult is None:  # not back yet
                    self._db.pipeline.sync()
                result = cur.pgresult
                self._rows = cur.fetchall() if result is not None and \
                    result.status == _TUPLES else []
            except psycopg.Error as e:
                raise self._db.error(e) from e
            self._rowcount = cur.rowcount
        return self._rows

    @property
    def rowcount(self) -> int:
        """The rows the statement changed."""
        self._settled()
        return self._rowcount

    def fetchone(self) -> Any:
        """The next row, or None."""
        rows = self._settled()
        if self._next >= len(rows):
            return None
        self._next += 1
        return rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        """The remaining rows."""
        rows = self._settled()
        rest, self._next = rows[self._next:], len(rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        """The remaining rows, one by one."""
        return iter(self.fetchall())


# in the arrays' order (a trigger moves audit_head for each row, in order: migration 0004)
_INSERT_EVENTS = (f"INSERT INTO audit_events ({AUDIT_COLUMNS}) SELECT {AUDIT_COLUMNS} FROM "
                  "unnest(?::float8[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], "
                  f"?::text[]) WITH ORDINALITY AS e ({AUDIT_COLUMNS}, n) ORDER BY n")


@lru_cache(maxsize=1024)
def _pg(sql: str) -> str:
    """``sql`` with psycopg's placeholders: ``?`` outside string literals becomes ``%s``, or
    ``%b`` when an array type follows (``?::text[]``: its list travels in binary, which
    psycopg writes several times faster than an array's text, quoted element by element with
    regular expressions; the cast says the type); a literal ``%`` is doubled."""
    out, quoted = [], False
    for i, ch in enumerate(sql):
        if ch == "'":
            quoted = not quoted  # a doubled '' inside a literal flips twice
        if ch == "?" and not quoted:
            out.append("%b" if _ARRAY_CAST.match(sql, i + 1) else "%s")
        else:
            out.append("%%" if ch == "%" else ch)
    return "".join(out)


_ARRAY_CAST = re.compile(r"::\w+(?: \w+)?\[\]")  # after a placeholder: an array's type


def _revision(conn: psycopg.Connection[Any]) -> str | None:
    """The schema's Alembic revision (None for a database stockade never set up)."""
    if conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT max(version_num) FROM alembic_version").fetchone()
    return str(row[0]) if row and row[0] is not None else None


def _options(conninfo: str, version: int) -> str:
    """The server options of the pool's connections: the URL's own, then those of
    :data:`_OPTIONS` a server of ``version`` (``server_version``: 150004) takes."""
    own = conninfo_to_dict(conninfo).get("options")
    return " ".join([*([str(own)] if own else []),
                     *(option for since, option in _OPTIONS.items() if version >= since)])


def _conninfo(url: str) -> tuple[str, str]:
    """libpq's connection string for ``url`` (with those of :data:`_CONNECTION_DEFAULTS` it
    does not set: timeouts, keepalives), and the URL as errors show it: without its
    password."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise StoreError(f"{_redacted(url)} is not a PostgreSQL URL", hint=_URL_HINT)
    try:
        params = conninfo_to_dict("postgresql://" + rest)
    except psycopg.Error as e:
        raise _invalid(url, e) from e
    extra = {k: v for k, v in _CONNECTION_DEFAULTS.items() if k not in params}
    user = f"{params['user']}@" if params.get("user") else ""
    where = f"postgresql://{user}{params.get('host') or 'localhost'}:" \
            f"{params.get('port') or 5432}/{params.get('dbname') or ''}"
    return make_conninfo("postgresql://" + rest, **extra), where


def _invalid(url: str, e: Exception) -> StoreError:
    """A StoreError for a URL libpq does not take (the reason without the password)."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    reason = " ".join(str(e).split())
    if at and ":" in userinfo:
        reason = reason.replace(userinfo.split(":", 1)[1], "***")
    return StoreError(f"the database URL {_redacted(url)} is not valid: {reason[:200]}",
                      hint=_URL_HINT)


def _redacted(url: str) -> str:
    """``url`` without the password it may hold, short and printable."""
    from stockade.text import escape_controls

    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return repr(escape_controls(f"{scheme}{sep}{rest}"[:120]))
