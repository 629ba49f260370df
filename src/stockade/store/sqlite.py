"""The embedded SQLite store (WAL), over the standard library driver for a lean CLI start."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stockade.audit import GENESIS, AuditEvent, chain_hash
from stockade.errors import StoreError
from stockade.store.interface import ArtifactRow, JobRow, LeaseRow, SecretRow, StepRow

HEAD_REVISION = "0003"  # tests check this equals the newest Alembic migration
_JOB_COLUMNS = ", ".join(JobRow._fields)
_SECRET_COLUMNS = ", ".join(SecretRow._fields)
_LEASE_COLUMNS = ", ".join(LeaseRow._fields)


def _job_row(row: tuple[Any, ...]) -> JobRow:
    return JobRow(*row)


class SqliteStore:
    """A :class:`~stockade.store.interface.Store` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fresh = not path.exists()
            # shared by the runner's threads (token refresh); every use holds self._lock
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._lock = threading.RLock()
            if fresh:
                os.chmod(path, 0o600)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._migrate_if_behind()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the state database {path}: {e}",
                             hint="check the file, or move it away to start afresh") from e

    def _migrate_if_behind(self) -> None:
        try:
            row = self._db.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            row = None
        if row and row[0] == HEAD_REVISION:
            return
        from stockade.store.migrate import upgrade

        try:
            upgrade(f"sqlite:///{self.path}")
        except Exception as e:  # Alembic and SQLAlchemy raise many types; translate all
            raise StoreError(f"cannot migrate {self.path}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"state database error: {e}") from e

    def _append_audit(self, db: sqlite3.Connection, event: AuditEvent) -> None:
        row = db.execute("SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
        prev = row[0] if row else GENESIS
        db.execute(
            "INSERT INTO audit_events (at, actor, action, job_id, detail_json, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event.at, event.actor, event.action, event.job_id,
             json.dumps(event.detail, sort_keys=True), prev, chain_hash(prev, event)),
        )

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
                  event_for: Callable[[JobRow], AuditEvent]) -> list[str]:
        """Mark running jobs with an expired lease (or in ``lost_ids``) failed: runner_lost."""
        with self._tx() as db:
            marks = ", ".join("?" for _ in lost_ids) or "NULL"
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'running' AND "
                              f"(lease_expires_at < ? OR id IN ({marks}))", (now, *lost_ids))
            lost = [_job_row(r) for r in rows]
            for job in lost:
                self._update(db, job.id, "status = 'running'", (), {
                    "status": "failed", "failure_reason": "runner_lost", "finished_at": now,
                    "lease_expires_at": None})
                self._append_audit(db, event_for(job))
            return [job.id for job in lost]

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get_job(self, id_or_prefix: str) -> JobRow | None:
        """A job by id or unique prefix (None if unknown or ambiguous)."""
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? OR id LIKE ? ESCAPE '\\' LIMIT 2",
            (id_or_prefix, id_or_prefix.replace("\\", "\\\\").replace("%", "\\%")
             .replace("_", "\\_") + "%"),
        )
        exact = [r for r in rows if r[0] == id_or_prefix]
        if exact:
            return JobRow(*exact[0])
        return JobRow(*rows[0]) if len(rows) == 1 else None

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
            out.append((AuditEvent(actor, action, at, jid, json.loads(detail)), prev, digest))
        return out

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

    def close(self) -> None:
        """Close the connection."""
        self._db.close()
