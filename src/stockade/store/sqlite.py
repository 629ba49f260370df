"""The embedded SQLite store (WAL), over the standard library driver for a lean CLI start."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.audit import GENESIS, AuditEvent, AuditHead, AuditSnapshot, HeadFile, chain_hash
from stockade.errors import StoreError
from stockade.store.interface import (
    ArtifactRow,
    JobRow,
    LeaseRow,
    SecretRow,
    StepRow,
    TokenRow,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection

HEAD_REVISION = "0006"  # tests check this equals the newest Alembic migration
_AWAY = ("restore it from a backup, or move it away so that stockade starts afresh (the moved "
         "file keeps its jobs and audit trail)")
_JOB_COLUMNS = ", ".join(JobRow._fields)
_SECRET_COLUMNS = ", ".join(SecretRow._fields)
_LEASE_COLUMNS = ", ".join(LeaseRow._fields)
_TOKEN_COLUMNS = ", ".join(TokenRow._fields)


def _job_row(row: tuple[Any, ...]) -> JobRow:
    return JobRow(*row)


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


class SqliteStore:
    """A :class:`~stockade.store.interface.Store` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.audit_head = HeadFile(path.with_name("audit.head"))  # the copy outside the file
        self._lock_path = path.with_name(path.name + ".lock")
        self._moved: tuple[AuditHead, AuditHead] | None = None  # the audit head in this tx
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
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
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

    def _append_audit(self, db: sqlite3.Connection, event: AuditEvent) -> None:
        row = db.execute("SELECT count, hash FROM audit_head WHERE id = 1").fetchone()
        if row is None:  # removed behind stockade's back: chain on from the start, visibly
            db.execute("INSERT INTO audit_head (id, count, hash) VALUES (1, 0, ?)", (GENESIS,))
            row = (0, GENESIS)
        before = AuditHead(*row)
        digest = chain_hash(before.hash, event)
        db.execute(  # a trigger moves audit_head in this statement (migration 0004)
            "INSERT INTO audit_events (at, actor, action, job_id, detail_json, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event.at, event.actor, event.action, event.job_id,
             json.dumps(event.detail, sort_keys=True), before.hash, digest),
        )
        self._moved = (self._moved[0] if self._moved else before,
                       AuditHead(before.events + 1, digest))

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

    def insert_job(self, job: JobRow, event: AuditEvent) -> None:
        """Add a new job and its audit event."""
        marks = ", ".join("?" for _ in JobRow._fields)
        with self._tx() as db:
            db.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({marks})", job)
            self._append_audit(db, event)

    @staticmethod
    def _update(db: sqlite3.Connection, job_id: str, cond: str, cond_args: tuple[Any, ...],
                changes: dict[str, Any]) -> bool:
        sets = ", ".join(f"{k} = ?" for k in changes)
        cur = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND {cond}",
                         (*changes.values(), job_id, *cond_args))
        return cur.rowcount == 1

    def claim_next(self, runner_id: str, lease_until: Callable[[JobRow], float],
                   event_for: Callable[[JobRow], AuditEvent],
                   eligible: Callable[[JobRow], bool]) -> JobRow | None:
        """Move the oldest eligible queued job to running for ``runner_id`` (one transaction)."""
        with self._tx() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'queued' "
                              "ORDER BY created_at")
            job = next((j for j in map(_job_row, rows) if eligible(j)), None)
            if job is None:
                return None
            changes: dict[str, Any] = {"status": "running", "runner_id": runner_id,
                                       "attempt": job.attempt + 1,
                                       "lease_expires_at": lease_until(job),
                                       "started_at": time.time()}
            self._update(db, job.id, "status = 'queued'", (), changes)
            claimed = job._replace(**changes)
            self._append_audit(db, event_for(claimed))
            return claimed

    def finish_job(self, job_id: str, runner_id: str, changes: dict[str, Any],
                   steps: list[StepRow], artifacts: list[ArtifactRow],
                   events: list[AuditEvent]) -> bool:
        """Record the outcome, steps and artifacts if ``runner_id`` still holds the job."""
        with self._tx() as db:
            if not self._update(db, job_id, "status = 'running' AND runner_id = ?",
                                (runner_id,), changes):
                return False
            db.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?)",
                           [(job_id, *s) for s in steps])
            db.executemany("INSERT INTO artifacts VALUES (?, ?, ?, ?)",
                           [(job_id, *a) for a in artifacts])
            for event in events:
                self._append_audit(db, event)
            return True

    def fail_lost(self, now: float, lost_ids: list[str],
                  runner_gone: Callable[[str], bool | None],
                  event_for: Callable[[JobRow], AuditEvent]) -> list[str]:
        """Mark jobs failed (runner_lost) that no runner will finish: in ``lost_ids``, queued
        or running for a runner that is gone, or running with an expired lease for a runner
        whose liveness is unknown (``runner_gone`` None; a live runner is never failed)."""
        if not lost_ids and not self._read("SELECT 1 FROM jobs WHERE status IN ('queued', "
                                           "'running') AND runner_id IS NOT NULL LIMIT 1"):
            return []  # the common case: no write transaction
        with self._tx() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN "
                              "('queued', 'running') AND runner_id IS NOT NULL")
            ids = set(lost_ids)
            lost = []
            for job in map(_job_row, rows):
                state = runner_gone(job.runner_id or "")
                expired = (job.status == "running" and job.lease_expires_at is not None
                           and job.lease_expires_at < now)
                if job.id in ids or state is True or (state is None and expired):
                    lost.append(job)
            for job in lost:
                self._update(db, job.id, "status = ?", (job.status,), {
                    "status": "failed", "failure_reason": "runner_lost", "finished_at": now,
                    "lease_expires_at": None})
                self._append_audit(db, event_for(job))
            return [job.id for job in lost]

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise self._error(e) from e

    def get_job(self, id_or_prefix: str) -> JobRow | None:
        """A job by id or unique prefix (None if unknown or ambiguous)."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? OR id LIKE ? ESCAPE '\\' LIMIT 2",
            (id_or_prefix, id_or_prefix.replace("\\", "\\\\").replace("%", "\\%")
             .replace("_", "\\_") + "%"),
        )
        exact = [r for r in rows if r[0] == id_or_prefix]
        if exact:
            return self._checked(JobRow(*exact[0]))
        return self._checked(JobRow(*rows[0])) if len(rows) == 1 else None

    def job_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` job ids starting with ``prefix``, newest first."""
        rows = self._read("SELECT id FROM jobs WHERE id LIKE ? ESCAPE '\\' "
                          "ORDER BY created_at DESC LIMIT ?",
                          (prefix.replace("\\", "\\\\").replace("%", "\\%")
                           .replace("_", "\\_") + "%", limit))
        return [str(r[0]) for r in rows]

    def _checked(self, job: JobRow) -> JobRow:
        """``job``, or a StoreError if its stored result is not the JSON object stockade wrote."""
        if job.result_json is None or isinstance(_json_or_none(job.result_json), dict):
            return job
        from stockade.text import escape_controls

        raise StoreError(f"the state database {self.path} is damaged: the result of job "
                         f"{escape_controls(str(job.id)[:40])} is not a JSON object", hint=_AWAY)

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
        """Audit records in order, with their chain hashes."""
        sql = "SELECT at, actor, action, job_id, detail_json, prev_hash, hash FROM audit_events"
        args: tuple[Any, ...] = ()
        if job_id is not None:
            sql, args = sql + " WHERE job_id = ?", (job_id,)
        out = []
        for at, actor, action, jid, detail, prev, digest in self._read(
                sql + " ORDER BY seq", args):
            parsed = _json_or_none(detail)  # not JSON: altered, and its hash will say so
            if not isinstance(parsed, dict):
                parsed = {"unreadable_detail": str(detail)[:200]}
            out.append((AuditEvent(actor, action, at, jid, parsed), prev, digest))
        return out

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

    def record(self, events: list[AuditEvent]) -> None:
        """Append audit events in one transaction."""
        with self._tx() as db:
            for event in events:
                self._append_audit(db, event)

    def put_secret(self, row: SecretRow, event: AuditEvent) -> None:
        """Create or replace a secret."""
        marks = ", ".join("?" for _ in SecretRow._fields)
        with self._tx() as db:
            db.execute(f"INSERT OR REPLACE INTO secrets ({_SECRET_COLUMNS}) VALUES ({marks})",
                       row)
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

    def revoke_leases(self, job_id: str, attempt: int, now: float,
                      event_for: Callable[[LeaseRow], AuditEvent]) -> list[LeaseRow]:
        """Revoke the attempt's live leases with an audit event each."""
        with self._tx() as db:
            rows = db.execute(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE job_id = ? AND "
                              "attempt = ? AND revoked_at IS NULL", (job_id, attempt))
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

    def get_token(self, token_id: str) -> TokenRow | None:
        """An API token by id."""
        rows = self._read(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE id = ?", (token_id,))
        return TokenRow(*rows[0]) if rows else None

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

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


def _json_or_none(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
