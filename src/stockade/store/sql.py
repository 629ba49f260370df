"""The queries SQLite and PostgreSQL share: :class:`SqlStore`, the base of both SQL stores.

A backend (and a mixin such as ``fleet.FleetQueries``) builds on this contract:

- ``_begin(head=True)``: one transaction, as a context manager yielding a :class:`Db` whose
  ``execute`` and ``executemany`` take ``?`` placeholders and return a :class:`Cursor`. It
  commits at the end and rolls back on an exception; a database error leaves it as a
  ``StoreError``. On SQLite it is ``BEGIN IMMEDIATE`` (writers take turns), on PostgreSQL a
  pooled connection's transaction (READ COMMITTED: writers of other rows go on) that locks the
  audit head first unless ``head`` is False (see ``_append_audit``). Queries use ``_tx()``, which is
  ``_begin()`` unless the thread runs a batch (:meth:`SqlStore.batched`): then the batch's.
- ``_fetch(sql, args)``: the rows of one short read, outside any write transaction. Queries
  use ``_read()``, which reads in the batch's transaction while the thread runs one.
- ``_append_audit(db, event)``: append one event to the hash chain in the transaction ``db``
  (in a batch's transaction: with the batch's other events, in one statement at its end, see
  ``_append_events``). On PostgreSQL it locks the one ``audit_head`` row, so every replica's
  appends take turns; and every write transaction there takes that lock first, before any
  other row (``_begin``): no two of them can each hold a row the other waits for (no
  deadlocks). Only uploads (no event, big rows: ``_tx(head=False)``) do without it.
- ``_skip_locked``: ``""`` on SQLite, ``" FOR UPDATE SKIP LOCKED"`` on PostgreSQL, for claim
  queries (rows another transaction is taking are passed over, not waited for).
- ``_for_update``: ``""`` on SQLite, ``" FOR UPDATE"`` on PostgreSQL, for rows read to be
  changed in the same transaction.
- ``_one_of(column, values)``: the condition that ``column`` is one of ``values`` and its
  arguments: ``IN (?, ...)`` on SQLite, ``= ANY(?::text[])`` on PostgreSQL (one statement
  whatever the number of values: prepared once, not planned again for each).
"""

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Protocol

from stockade.audit import GENESIS, AuditEvent, AuditHead, chain_hash
from stockade.errors import StoreError
from stockade.store.interface import (
    ArtifactRow,
    JobRow,
    LeaseRow,
    SecretRow,
    StepRow,
    TokenRow,
)

HEAD_REVISION = "0012"  # tests check this equals the newest Alembic migration
_JOB_COLUMNS = ", ".join(JobRow._fields)
_SECRET_COLUMNS = ", ".join(SecretRow._fields)
_LEASE_COLUMNS = ", ".join(LeaseRow._fields)
_TOKEN_COLUMNS = ", ".join(TokenRow._fields)
HEAD_SQL = "SELECT count, hash FROM audit_head WHERE id = 1"  # the audit head record
AUDIT_COLUMNS = "at, actor, action, job_id, detail_json, prev_hash, hash"
_ROWS_PER_INSERT = 64  # audit events per INSERT statement (7 parameters each)


# jobs held by a runner of this host (stockade run's own): runner agents' jobs are the lease
# sweeper's (store/fleet.py), which requeues them
_LOCAL_HELD = ("status IN ('queued', 'running') AND runner_id IS NOT NULL AND runner_id NOT IN "
               "(SELECT id FROM runners)")


class Cursor(Protocol):
    """The result of a statement (``sqlite3.Cursor``, ``psycopg.Cursor``)."""

    @property
    def rowcount(self) -> int:
        """Rows the statement changed."""
        ...

    def fetchone(self) -> Any:
        """The next row, or None."""
        ...

    def fetchall(self) -> list[Any]:
        """The remaining rows."""
        ...

    def __iter__(self) -> Iterator[Any]:
        """The remaining rows, one by one."""
        ...


class Db(Protocol):
    """A connection in a transaction; statements use ``?`` placeholders."""

    def execute(self, sql: str, args: Any = (), /) -> Cursor:
        """Run one statement."""
        ...

    def executemany(self, sql: str, seq: Iterable[Any], /) -> Cursor:
        """Run one statement for each argument tuple of ``seq``."""
        ...


class _Batch:
    """The transaction the calls of one batch share (:meth:`SqlStore.batched`), begun by the
    first call that writes."""

    __slots__ = ("db", "events", "spoiled", "stack")

    def __init__(self, stack: ExitStack) -> None:
        self.db: Db | None = None
        self.spoiled, self.stack = False, stack
        self.events: list[AuditEvent] = []  # appended at the batch's end, in this order


class Undone(StoreError):
    """A transaction failed at its commit and nothing of it stands: the database refused one
    of its statements, sent without waiting for its result (PostgreSQL's pipeline), so which
    call of a batch it was is not known."""


class _Redo(Exception):
    """The call at ``index`` failed (``error``), or spoiled the batch's transaction (a store
    call in it failed and the call went on): undo the batch. ``index`` None: the batch failed
    after its calls ran (its events, its commit: :class:`Undone`), none of it stands."""

    def __init__(self, index: int | None, error: Exception | None = None) -> None:
        super().__init__(index)
        self.index, self.error = index, error


def _outcome(call: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, call()
    except Exception as e:  # the caller's: handed back, raised where it waits
        return False, e


class SqlStore:
    """The :class:`~stockade.store.interface.Store` queries both SQL backends share; a
    subclass provides the connection (see the module docstring for the contract)."""

    _skip_locked = ""
    _for_update = ""
    _like = "LIKE"  # the prefix match: SQLite's LIKE ignores the case of ASCII letters
    _where = ""  # the database, as errors name it (a path, or a URL without its password)
    _damaged_hint = "restore the database from a backup"

    def _begin(self, head: bool = True) -> AbstractContextManager[Db]:
        raise NotImplementedError

    @staticmethod
    def _one_of(column: str, values: list[str]) -> tuple[str, tuple[Any, ...]]:
        return f"{column} IN ({', '.join('?' for _ in values)})", tuple(values)

    def _fetch(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        raise NotImplementedError

    def _translated(self, e: Exception) -> Exception:
        """``e`` as a ``StoreError`` if it is the database driver's (a call's statement raised
        it in a batch's transaction, not through ``_begin``), else ``e``."""
        return e

    def _local(self) -> threading.local:
        local: threading.local | None = self.__dict__.get("_local_")
        if local is None:
            local = self.__dict__.setdefault("_local_", threading.local())
        return local

    def _batch(self) -> _Batch | None:
        """The batch this thread runs, if any."""
        batch: _Batch | None = getattr(self._local(), "batch", None)
        return batch

    def _tx(self, head: bool = True) -> AbstractContextManager[Db]:
        """A transaction of one's own, or the batch's this thread runs (begun now if it has
        not been yet; a batch's always takes the audit head first). ``head=False``: one that
        appends no event and may hold big rows (uploads) does not wait for the head."""
        batch = self._batch()
        if batch is None:
            return self._begin(head)
        if batch.db is None:
            batch.db = batch.stack.enter_context(self._begin())
        return _joined(batch)

    def _writing(self) -> bool:
        """Whether this thread's batch has begun its transaction (a read to spare a write
        transaction spares nothing then)."""
        batch = self._batch()
        return batch is not None and batch.db is not None

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """One short read (in the batch's transaction once this thread's batch began one)."""
        batch = self._batch()
        if batch is None or batch.db is None:
            return self._fetch(sql, args)
        try:
            return list(batch.db.execute(sql, args).fetchall())
        except BaseException:  # (on PostgreSQL, maybe an earlier statement's error)
            batch.spoiled = True
            raise

    def batched(self, calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Run ``calls`` (each a store call, or code making store calls) in one transaction
        and one commit, in order: ``(True, result)`` or ``(False, exception)`` for each (group
        commit: a server's concurrent requests share the cost of a transaction, and on
        PostgreSQL of the wait for the audit head). The transaction begins with the first call
        that writes: a batch of reads takes no write lock. No result is handed out before the
        commit. If a call fails, or one of its transactions ends by an exception (which undoes
        only that transaction's writes when it has its own), the batch is undone, that call
        runs alone and the others together again; a call must therefore keep no effect outside
        the database that running it twice would double (as a retry would). If the batch
        fails after its calls (appending its events, or :class:`Undone` at the commit: a
        statement that failed without saying so at once), every call runs alone. A call alone
        runs in one transaction too: it fails whole, without running again (unless it spoiled
        the transaction: see :meth:`_alone`)."""
        out: list[tuple[bool, Any] | None] = [None] * len(calls)
        pending = list(range(len(calls)))
        while len(pending) > 1:
            try:
                for i, result in zip(pending, self._together([calls[i] for i in pending]),
                                     strict=True):
                    out[i] = result
                return [o for o in out if o is not None]
            except _Redo as redo:
                if redo.index is None:  # which call's statement failed is not known
                    break  # each alone
                alone = pending.pop(redo.index)
                out[alone] = self._alone(calls[alone])
        for i in pending:
            out[i] = self._alone(calls[i])
        return [o for o in out if o is not None]

    def _alone(self, call: Callable[[], Any]) -> tuple[bool, Any]:
        """One call's outcome in a transaction of its own (begun at its first write, undone
        if it fails). A call that went on after a store call of it failed (it caught the
        error) spoiled that transaction: it runs once more with each of its store calls a
        transaction of its own, as outside a batch."""
        try:
            return self._together([call])[0]
        except _Redo as redo:
            if redo.error is not None:
                return False, redo.error
            return _outcome(call)
        except Exception as e:  # the commit failed
            return False, e

    def _together(self, calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        local, out = self._local(), []
        redo: _Redo | None = None
        try:
            with ExitStack() as stack:  # the transaction, once a call begins it
                local.batch = batch = _Batch(stack)
                try:
                    for i, call in enumerate(calls):
                        try:
                            out.append((True, call()))
                        except Exception as e:
                            redo = _Redo(i, self._translated(e))
                            raise redo from None
                        if batch.spoiled:
                            redo = _Redo(i)
                            raise redo
                    if batch.events:
                        assert batch.db is not None
                        try:
                            self._append_events(batch.db, batch.events)
                        except Exception as e:  # or a call's statement, failing only now
                            redo = _Redo(None, self._translated(e))
                            raise redo from None
                finally:
                    local.batch = None
        except Undone as e:  # at the commit: some call's statement, not known which
            raise _Redo(None, e) from None
        except Exception:
            if redo is not None:  # even if undoing failed too (the connection was lost)
                raise redo from None
            raise
        return out

    def _audit_moved(self, before: AuditHead, after: AuditHead) -> None:
        """Called in the transaction that appended events: the head before them and after
        (SQLite moves its head file once the transaction commits)."""

    def _append_audit(self, db: Db, event: AuditEvent) -> None:
        self._append_all(db, [event])

    def _append_all(self, db: Db, events: list[AuditEvent]) -> None:
        """Append ``events`` in the transaction ``db``: with the batch's others at its end,
        or at once in one go."""
        batch = self._batch()
        if batch is not None and batch.db is db:
            batch.events += events
        elif events:
            self._append_events(db, events)

    def _append_events(self, db: Db, events: list[AuditEvent]) -> None:
        """Chain ``events`` onto the head (locked first) and insert them: one statement for
        each :data:`_ROWS_PER_INSERT` events."""
        head = HEAD_SQL + self._for_update
        row = db.execute(head).fetchone()
        if row is None:  # removed behind stockade's back: chain on from the start, visibly
            db.execute("INSERT INTO audit_head (id, count, hash) VALUES (1, 0, ?) "
                       "ON CONFLICT (id) DO NOTHING", (GENESIS,))
            row = db.execute(head).fetchone()
        before = after = AuditHead(*row)
        for start in range(0, len(events), _ROWS_PER_INSERT):
            values: list[Any] = []
            for event in events[start:start + _ROWS_PER_INSERT]:
                digest = chain_hash(after.hash, event)
                values += (event.at, event.actor, event.action, event.job_id,
                           json.dumps(event.detail, sort_keys=True), after.hash, digest)
                after = AuditHead(after.events + 1, digest)
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * (len(values) // 7))
            # a trigger moves audit_head for each row, in order (migration 0004)
            db.execute(f"INSERT INTO audit_events ({AUDIT_COLUMNS}) VALUES {marks}", values)
        self._audit_moved(before, after)

    def insert_job(self, job: JobRow, event: AuditEvent) -> None:
        """Add a new job and its audit event."""
        marks = ", ".join("?" for _ in JobRow._fields)
        with self._tx() as db:
            db.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({marks})", job)
            self._append_audit(db, event)

    @staticmethod
    def _update(db: Db, job_id: str, cond: str, cond_args: tuple[Any, ...],
                changes: dict[str, Any]) -> bool:
        sets = ", ".join(f"{k} = ?" for k in changes)
        cur = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND {cond}",
                         (*changes.values(), job_id, *cond_args))
        return cur.rowcount == 1

    def fail_lost(self, now: float, lost_ids: list[str],  # (runner agents': the sweeper's)
                  runner_gone: Callable[[str], bool | None],
                  event_for: Callable[[JobRow], AuditEvent]) -> list[str]:
        """Mark jobs failed (runner_lost) that no runner will finish: in ``lost_ids``, queued
        or running for a runner that is gone, or running with an expired lease for a runner
        whose liveness is unknown (``runner_gone`` None; a live runner is never failed)."""
        if not lost_ids and not self._read(f"SELECT 1 FROM jobs WHERE {_LOCAL_HELD} LIMIT 1"):
            return []  # the common case: no write transaction
        with self._tx() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {_LOCAL_HELD}"
                              f"{self._skip_locked}")  # skipped: changing
            ids = set(lost_ids)
            lost = []
            for job in (JobRow(*r) for r in rows):
                state = runner_gone(job.runner_id or "")
                expired = (job.status == "running" and job.lease_expires_at is not None
                           and job.lease_expires_at < now)
                if job.id in ids or state is True or (state is None and expired):
                    lost.append(job)
            lost = [job for job in lost if self._update(db, job.id, "status = ?", (job.status,), {
                "status": "failed", "failure_reason": "runner_lost", "finished_at": now,
                "lease_expires_at": None})]
            for job in lost:  # after the updates: the audit head is taken last
                self._append_audit(db, event_for(job))
            return [job.id for job in lost]

    def get_job(self, id_or_prefix: str) -> JobRow | None:
        """A job by id or unique prefix (None if unknown or ambiguous)."""
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id_or_prefix,))
        if not rows:
            rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id {self._like} ? "
                              "ESCAPE '\\' LIMIT 2", (_prefix_pattern(id_or_prefix),))
        return self._checked(JobRow(*rows[0])) if len(rows) == 1 else None

    def job_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` job ids starting with ``prefix``, newest first."""
        rows = self._read(f"SELECT id FROM jobs WHERE id {self._like} ? ESCAPE '\\' "
                          "ORDER BY created_at DESC LIMIT ?", (_prefix_pattern(prefix), limit))
        return [str(r[0]) for r in rows]

    def _checked(self, job: JobRow) -> JobRow:
        """``job``, or a StoreError if its stored result is not the JSON object stockade wrote."""
        if job.result_json is None or isinstance(_json_or_none(job.result_json), dict):
            return job
        from stockade.text import escape_controls

        raise StoreError(f"the state database {self._where} is damaged: the result of job "
                         f"{escape_controls(str(job.id)[:40])} is not a JSON object",
                         hint=self._damaged_hint)

    def list_jobs(self, limit: int) -> list[JobRow]:
        """The newest jobs first."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [JobRow(*r) for r in rows]

    def job_steps(self, job_id: str) -> list[StepRow]:
        """The job's steps in order."""
        rows = self._read("SELECT idx, name, status, exit_code, duration_s FROM steps "
                          "WHERE job_id = ? ORDER BY idx", (job_id,))
        return [StepRow(*r) for r in rows]

    def job_artifacts(self, job_id: str) -> list[ArtifactRow]:
        """The job's artifacts by path."""
        rows = self._read("SELECT path, sha256, size FROM artifacts WHERE job_id = ? "
                          "ORDER BY path", (job_id,))
        return [ArtifactRow(*r) for r in rows]

    def audit_records(self, job_id: str | None = None) -> list[tuple[AuditEvent, str, str]]:
        """Audit records in order, with their chain hashes (in a batch, with the events its
        calls appended so far: they are written out first)."""
        batch = self._batch()
        if batch is not None and batch.db is not None and batch.events:
            events, batch.events = batch.events, []
            self._append_events(batch.db, events)
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit_events"
        args: tuple[Any, ...] = ()
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", (job_id,)
        return audit_records(self._read(sql + " ORDER BY seq", args))

    def record(self, events: list[AuditEvent]) -> None:
        """Append audit events in one transaction."""
        with self._tx() as db:
            for event in events:
                self._append_audit(db, event)

    def put_secret(self, row: SecretRow, event: AuditEvent) -> None:
        """Create or replace a secret."""
        marks = ", ".join("?" for _ in SecretRow._fields)
        sets = ", ".join(f"{c} = excluded.{c}" for c in SecretRow._fields[1:])
        with self._tx() as db:
            db.execute(f"INSERT INTO secrets ({_SECRET_COLUMNS}) VALUES ({marks}) "
                       f"ON CONFLICT (name) DO UPDATE SET {sets}", row)
            self._append_audit(db, event)

    def get_secret(self, name: str) -> SecretRow | None:
        """A secret by name."""
        rows = self._read(f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ?", (name,))
        return SecretRow(*rows[0]) if rows else None

    def list_secrets(self) -> list[SecretRow]:
        """All secrets by name."""
        rows = self._read(f"SELECT {_SECRET_COLUMNS} FROM secrets ORDER BY name")
        return [SecretRow(*r) for r in rows]

    def delete_secret(self, name: str, event: AuditEvent) -> bool:
        """Remove a secret."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 1
            if gone:
                self._append_audit(db, event)
            return gone

    def insert_leases(self, leases: list[LeaseRow], events: list[AuditEvent]) -> None:
        """Record issued leases with their audit events."""
        marks = ", ".join("?" for _ in LeaseRow._fields)
        with self._tx() as db:
            db.executemany(f"INSERT INTO leases ({_LEASE_COLUMNS}) VALUES ({marks})",
                           leases)
            for event in events:
                self._append_audit(db, event)

    def get_lease(self, lease_id: str) -> LeaseRow | None:
        """A lease by id."""
        rows = self._read(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE id = ?", (lease_id,))
        return LeaseRow(*rows[0]) if rows else None

    def live_leases(self, job_id: str, attempt: int) -> list[LeaseRow]:
        """The secret leases an attempt holds and that were not revoked."""
        return [LeaseRow(*r) for r in self._read(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE job_id = ? AND attempt = ? AND "
            "revoked_at IS NULL ORDER BY id", (job_id, attempt))]

    def revoke_leases(self, job_id: str, attempt: int, now: float,
                      event_for: Callable[[LeaseRow], AuditEvent]) -> list[LeaseRow]:
        """Revoke the attempt's live leases with an audit event each."""
        if not self._read("SELECT 1 FROM leases WHERE job_id = ? AND attempt = ? AND "
                          "revoked_at IS NULL LIMIT 1", (job_id, attempt)):
            return []  # the common case (a job without secrets): no write transaction
        with self._tx() as db:
            rows = db.execute(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE job_id = ? AND "
                              f"attempt = ? AND revoked_at IS NULL{self._for_update}",
                              (job_id, attempt))
            live = [LeaseRow(*r) for r in rows]
            db.execute("UPDATE leases SET revoked_at = ? WHERE job_id = ? AND attempt = ? "
                       "AND revoked_at IS NULL", (now, job_id, attempt))
            for lease in live:
                self._append_audit(db, event_for(lease))
            return live

    def insert_token(self, token: TokenRow, event: AuditEvent) -> None:
        """Add an API token (its secret's hash only) and its audit event."""
        with self._tx() as db:
            db.execute(f"INSERT INTO api_tokens ({_TOKEN_COLUMNS}) VALUES "
                       f"({', '.join('?' for _ in TokenRow._fields)})", token)
            self._append_audit(db, event)

    def get_tokens(self, token_ids: list[str]) -> dict[str, TokenRow]:
        """API tokens by id (one query: it authenticates every request of a server's batch
        that carries one)."""
        if not token_ids:
            return {}
        where, args = self._one_of("id", token_ids)
        rows = self._read(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE {where}", args)
        return {str(row[0]): TokenRow(*row) for row in rows}

    def tokens(self) -> list[TokenRow]:
        """Every API token, newest first."""
        return [TokenRow(*r) for r in self._read(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at DESC")]

    def revoke_token(self, token_id: str, now: float, event: AuditEvent) -> bool:
        """Revoke a token not revoked yet (False if there is none)."""
        with self._tx() as db:
            cur = db.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND "
                             "revoked_at IS NULL", (now, token_id))
            if cur.rowcount != 1:
                return False
            self._append_audit(db, event)
            return True


@contextmanager
def _joined(batch: _Batch) -> Iterator[Db]:
    """A transaction within a batch's: one that ends by an exception spoils the batch."""
    assert batch.db is not None
    try:
        yield batch.db
    except BaseException:
        batch.spoiled = True
        raise


def audit_records(rows: Iterable[Any]) -> list[tuple[AuditEvent, str, str]]:
    """``(event, prev_hash, hash)`` of rows of ``audit_events`` (columns as ``AUDIT_COLUMNS``);
    a detail that is not a JSON object (altered: its hash will say so) is kept as text."""
    out = []
    for at, actor, action, jid, detail, prev, digest in rows:
        parsed = _json_or_none(detail)
        if not isinstance(parsed, dict):
            parsed = {"unreadable_detail": str(detail)[:200]}
        out.append((AuditEvent(actor, action, at, jid, parsed), prev, digest))
    return out


def _prefix_pattern(prefix: str) -> str:
    """A LIKE pattern (escape ``\\``) matching what starts with ``prefix``, taken literally."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _json_or_none(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
