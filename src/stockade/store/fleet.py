"""The fleet's transactions (runner agents, attempts, leases, log chunks, blobs), in SQL that
SQLite and PostgreSQL both speak; a mixin of the SQL stores.

It relies on the base store for ``_tx()`` (one transaction; ``?`` placeholders), ``_read()``,
``_append_audit(db, event)`` and ``_skip_locked`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
that replicas claiming at once never wait for each other nor take the same job).

Fencing: every write of a runner names its job, attempt and runner, and changes something only
while that attempt is the job's current one and still running; a runner that lost its lease
(partitioned, paused, too slow) cannot complete, log to or extend a job another attempt now
holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from stockade.audit import AuditEvent
from stockade.store.interface import (
    ArtifactRow,
    AttemptRow,
    ClaimRequest,
    EnrolTokenRow,
    FinishRequest,
    JobRow,
    LeaseRow,
    Revocation,
    RunnerRow,
    SessionRow,
    StepRow,
)

# queued candidates looked at (and, on PostgreSQL, locked) by each query of a claim: 256 in all
CLAIM_BATCHES = (2, 14, 48, 64, 128)
_JOB_COLUMNS = ", ".join(JobRow._fields)
_RUNNER_COLUMNS = ", ".join(RunnerRow._fields)
ATTEMPT_COLUMNS = ", ".join(AttemptRow._fields)
_ENROL_COLUMNS = ", ".join(EnrolTokenRow._fields)
_SESSION_COLUMNS = ", ".join(SessionRow._fields)
LEASE_COLUMNS = ", ".join(LeaseRow._fields)
# the attempt is the job's current, running one, and its runner not quarantined: from the
# quarantine's commit on, nothing of that runner lands, before its jobs are failed too
RUNNING = ("status = 'running' AND attempt = ? AND runner_id = ? AND runner_id NOT IN "
           "(SELECT id FROM runners WHERE status = 'quarantined')")
ACTIVE = " AND status = 'active'"
_CHUNK_SHA = "SELECT sha256 FROM log_chunks WHERE job_id = ? AND attempt = ? AND seq = ?"


class FleetQueries:
    """Fleet transactions; mixed into a SQL store (see the module docstring)."""

    _skip_locked: str
    _for_update: str

    if TYPE_CHECKING:  # the base store's (nothing here may shadow them)
        def _tx(self, head: bool = True) -> AbstractContextManager[Any]: ...

        def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]: ...

        @staticmethod
        def _one_of(column: str, values: list[str]) -> tuple[str, tuple[Any, ...]]: ...

        def _append_audit(self, db: Any, event: AuditEvent) -> None: ...

        def _writing(self) -> bool: ...

    # -- jobs and attempts ----------------------------------------------------------------

    def _candidates(self, db: Any, runner_id: str) -> Iterator[JobRow]:
        """The queued jobs ``runner_id`` may take, oldest first (locked, skipping those being
        taken, on PostgreSQL)."""
        args: tuple[Any, ...]
        after, args = "", (runner_id,)  # the first query reads from the head of the queue
        for size in CLAIM_BATCHES:  # few rows first: the oldest queued job is usually taken
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'queued' AND "
                f"(runner_id IS NULL OR runner_id = ?){after} ORDER BY created_at, id "
                f"LIMIT {size}{self._skip_locked}", args).fetchall()
            for row in rows:
                yield JobRow(*row)
            if len(rows) < size:
                return
            # the position as one row comparison: an index range that stops after ``size``
            # rows (an OR of two comparisons made PostgreSQL read and sort the whole queue)
            after = " AND (created_at, id) > (?, ?)"
            args = (runner_id, rows[-1][JobRow._fields.index("created_at")], rows[-1][0])

    def claim_attempt(self, runner_id: str, lease_until: Callable[[JobRow], float],
                      event_for: Callable[[JobRow], AuditEvent],
                      eligible: Callable[[JobRow], bool], agent: bool = False,
                      after: tuple[str, int] | None = None) -> JobRow | None:
        """Move the oldest eligible queued job to running for ``runner_id`` as its next
        attempt (recorded in ``attempts``), in one transaction; for a runner ``agent``, only
        while it is active (read in the same transaction: a runner drained or quarantined a
        moment ago gets nothing). ``after``: the attempt whose completion claims it (which
        remembers it, see :meth:`handed_next`)."""
        if not self._writing() and not self._read(
                "SELECT 1 FROM jobs WHERE status = 'queued' AND (runner_id IS NULL OR "
                "runner_id = ?) LIMIT 1", (runner_id,)):
            return None  # nothing to take: no write transaction (long polls look often)
        with self._tx() as db:
            now = time.time()
            # seen now, and still active (its row stays locked until the commit)
            cur = db.execute("UPDATE runners SET last_seen_at = ? WHERE id = ?"
                             + (ACTIVE if agent else ""), (now, runner_id))
            if agent and cur.rowcount != 1:
                return None
            job = next((j for j in self._candidates(db, runner_id) if eligible(j)), None)
            if job is None:
                return None
            changes: dict[str, Any] = {"status": "running", "runner_id": runner_id,
                                       "attempt": job.attempt + 1,
                                       "lease_expires_at": lease_until(job), "started_at": now}
            self._take(db, job.id, changes, after)
            claimed = job._replace(**changes)
            self._append_audit(db, event_for(claimed))
            return claimed

    def claim_attempts(self, requests: list[ClaimRequest]) -> list[JobRow | None]:
        """Several claims, in order (here one after the other: each is one statement or
        two on SQLite, whose writers take turns anyway)."""
        return [self.claim_attempt(*r) for r in requests]

    def finish_attempts(self, requests: list[FinishRequest]) -> list[bool]:
        """Several attempts' ends, in order."""
        return [self.finish_attempt(*r) for r in requests]

    def finish_and_claim(self, finishes: list[FinishRequest], claims: list[ClaimRequest],
                         after: list[int | None]) -> tuple[list[bool], list[JobRow | None]]:
        """The attempts' ends, then the claims whose completion was recorded (here one
        after the other)."""
        held = self.finish_attempts(finishes)
        usable = [j for j, a in enumerate(after) if a is None or held[a]]
        jobs: list[JobRow | None] = [None] * len(claims)
        for j, job in zip(usable, self.claim_attempts([claims[j] for j in usable]),
                          strict=True):
            jobs[j] = job
        return held, jobs

    @staticmethod
    def _take(db: Any, job_id: str, changes: dict[str, Any],
              after: tuple[str, int] | None) -> None:
        """A claim's writes (the job locked and queued): the job running ``changes``, its new
        attempt, and the attempt ``after`` remembering it."""
        sets = ", ".join(f"{k} = ?" for k in changes)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status = 'queued'",
                   (*changes.values(), job_id))
        db.execute(f"INSERT INTO attempts ({ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (job_id, changes["attempt"], changes["runner_id"], changes["started_at"],
                    None, "running", 0))
        if after is not None:
            db.execute("UPDATE attempts SET next_job_id = ?, next_attempt = ? WHERE "
                       "job_id = ? AND attempt = ? AND runner_id = ?",
                       (job_id, changes["attempt"], *after, changes["runner_id"]))

    def finish_attempt(self, job_id: str, attempt: int, runner_id: str,
                       changes: dict[str, Any], steps: list[StepRow],
                       artifacts: list[ArtifactRow], events: list[AuditEvent],
                       revoke: Revocation | None = None) -> bool:
        """Record the outcome, steps and artifacts if this attempt still holds the job; with
        ``revoke``, the attempt's live secret leases are revoked in the same transaction."""
        with self._tx() as db:
            revoked = self._finish(db, job_id, attempt, runner_id, changes,
                                   None if revoke is None else revoke.at)
            if revoked is None:
                return False
            if attempt > 1:  # what a lost attempt may have left
                db.execute("DELETE FROM steps WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
            if steps:
                db.executemany("INSERT INTO steps (job_id, idx, name, status, exit_code, "
                               "duration_s) VALUES (?, ?, ?, ?, ?, ?)",
                               [(job_id, *s) for s in steps])
            if artifacts:
                db.executemany("INSERT INTO artifacts (job_id, path, sha256, size) "
                               "VALUES (?, ?, ?, ?)", [(job_id, *a) for a in artifacts])
            for event in events:
                self._append_audit(db, event)
            for lease in revoked:
                assert revoke is not None
                self._append_audit(db, revoke.event_for(lease))
            return True

    def _finish(self, db: Any, job_id: str, attempt: int, runner_id: str,
                changes: dict[str, Any], revoke_at: float | None) -> list[LeaseRow] | None:
        """An attempt's outcome on its job and its attempt row if it still holds the job, and
        with ``revoke_at`` its live leases revoked: those leases (None: not held)."""
        sets = ", ".join(f"{k} = ?" for k in changes)
        cur = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND {RUNNING}",
                         (*changes.values(), job_id, attempt, runner_id))
        if cur.rowcount != 1:
            return None
        db.execute("UPDATE attempts SET ended_at = ?, outcome = ? WHERE job_id = ? AND "
                   "attempt = ?", (time.time(), changes.get("status", "finished"), job_id,
                                   attempt))
        if revoke_at is None:
            return []
        live = [LeaseRow(*r) for r in db.execute(
            f"SELECT {LEASE_COLUMNS} FROM leases WHERE job_id = ? AND attempt = ? AND "
            f"revoked_at IS NULL ORDER BY id{self._for_update}", (job_id, attempt)).fetchall()]
        if live:
            db.execute("UPDATE leases SET revoked_at = ? WHERE job_id = ? AND attempt = ? AND "
                       "revoked_at IS NULL", (revoke_at, job_id, attempt))
        return [lease._replace(revoked_at=revoke_at) for lease in live]

    def extend_lease(self, job_id: str, attempt: int, runner_id: str,
                     until: float) -> tuple[bool, bool]:
        """A heartbeat: ``(held, cancel_requested)``; the lease moves only while held."""
        with self._tx() as db:
            cur = db.execute(f"UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND {RUNNING}",
                             (until, job_id, attempt, runner_id))
            if cur.rowcount != 1:
                return False, False
            db.execute("UPDATE runners SET last_seen_at = ? WHERE id = ?", (time.time(),
                                                                            runner_id))
            row = db.execute("SELECT cancel_requested_at FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            return True, row is not None and row[0] is not None

    def ended_attempt(self, job_id: str, attempt: int, runner_id: str
                      ) -> tuple[str, str | None, int | None] | None:
        """``(outcome, next job, its attempt)`` of an attempt ``runner_id`` ran and that
        ended, or None."""
        rows = self._read("SELECT outcome, next_job_id, next_attempt FROM attempts WHERE "
                          "job_id = ? AND attempt = ? AND runner_id = ? AND ended_at IS NOT "
                          "NULL", (job_id, attempt, runner_id))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def holds(self, job_id: str, attempt: int, runner_id: str) -> bool:
        """Whether this attempt of ``runner_id`` is the job's current, running one."""
        return bool(self._read(f"SELECT 1 FROM jobs WHERE id = ? AND {RUNNING}",
                               (job_id, attempt, runner_id)))

    def expire_leases(self, now: float, event_for: Callable[[JobRow, bool], AuditEvent]
                      ) -> list[tuple[JobRow, bool]]:
        """Running jobs of runner agents whose lease ran out: the attempt is ``lost``; the job
        is queued again while it has attempts left (True), failed ``runner_lost`` otherwise.
        Jobs of ``stockade run`` (no runner agent) are left to ``fail_lost``."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'running' AND "
                "lease_expires_at < ? AND runner_id IN (SELECT id FROM runners)"
                f"{self._skip_locked}", (now,)).fetchall()
            out = []
            for job in map(lambda r: JobRow(*r), rows):
                again = job.attempt < job.max_attempts and job.cancel_requested_at is None
                self._lose(db, job, again, now)
                out.append((job, again))
            for job, again in out:  # after the updates: the audit head is taken last
                self._append_audit(db, event_for(job, again))
            return out

    @staticmethod
    def _lose(db: Any, job: JobRow, again: bool, now: float) -> None:
        if again:
            db.execute("UPDATE jobs SET status = 'queued', runner_id = NULL, "
                       "lease_expires_at = NULL WHERE id = ? AND attempt = ?",
                       (job.id, job.attempt))
        else:
            db.execute("UPDATE jobs SET status = 'failed', failure_reason = 'runner_lost', "
                       "finished_at = ?, lease_expires_at = NULL WHERE id = ? AND attempt = ?",
                       (now, job.id, job.attempt))
        db.execute("UPDATE attempts SET ended_at = ?, outcome = 'lost' WHERE job_id = ? AND "
                   "attempt = ?", (now, job.id, job.attempt))

    def schema_revision(self) -> str | None:
        """The database's schema revision (None if it has none)."""
        rows = self._read("SELECT version_num FROM alembic_version")
        return str(rows[0][0]) if rows else None

    def count_jobs_by_status(self) -> list[tuple[str, int]]:
        """How many jobs there are of each status."""
        return [(str(s), int(n)) for s, n in self._read(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")]

    def attempts(self, job_id: str) -> list[AttemptRow]:
        """The attempts of a job, in order."""
        return [AttemptRow(*r) for r in self._read(
            f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = ? ORDER BY attempt",
            (job_id,))]

    def request_cancel(self, job_id: str, now: float, event: AuditEvent) -> str | None:
        """Cancel a job: a queued one fails ``canceled`` at once (``"canceled"``), a running
        one is asked to stop at its runner's next heartbeat (``"requested"``); None if the
        job is unknown or finished."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'failed', failure_reason = 'canceled', "
                             "finished_at = ?, cancel_requested_at = ? WHERE id = ? AND "
                             "status = 'queued'", (now, now, job_id))
            state = "canceled" if cur.rowcount == 1 else None
            if state is None:
                cur = db.execute("UPDATE jobs SET cancel_requested_at = ? WHERE id = ? AND "
                                 "status = 'running' AND cancel_requested_at IS NULL",
                                 (now, job_id))
                state = "requested" if cur.rowcount == 1 else None
            if state is not None:
                self._append_audit(db, event._replace(detail={**event.detail, "state": state}))
            return state

    # -- enrolment, runners and sessions --------------------------------------------------

    def insert_enrol_token(self, row: EnrolTokenRow, event: AuditEvent) -> None:
        """Add an enrolment token and its audit event."""
        with self._tx() as db:
            db.execute(f"INSERT INTO enrol_tokens ({_ENROL_COLUMNS}) VALUES "
                       f"({', '.join('?' for _ in EnrolTokenRow._fields)})", row)
            self._append_audit(db, event)

    def enrol(self, token_id: str, check: Callable[[EnrolTokenRow | None], str | None],
              runner: RunnerRow, session: SessionRow, events: list[AuditEvent]) -> str | None:
        """Spend the enrolment token (if ``check`` finds nothing wrong with it: else return
        what it found, changing nothing) and add the runner with its first session: in the
        token's pool (and so with the label ``pool:<pool>``), with the token's highest trust,
        and with the labels it asked for (``check`` saw they are the token's) or else all the
        token's."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_ENROL_COLUMNS} FROM enrol_tokens WHERE id = ?",
                             (token_id,)).fetchone()
            token = EnrolTokenRow(*row) if row else None
            why = check(token)
            if why is not None or token is None:
                return why or "unknown enrolment token"
            labels = json.loads(runner.labels_json) or json.loads(token.labels_json)
            runner = runner._replace(pool=token.pool, max_trust=token.max_trust,
                                     labels_json=json.dumps(sorted({*labels,
                                                                    f"pool:{token.pool}"})))
            cur = db.execute("UPDATE enrol_tokens SET used_at = ?, runner_id = ? WHERE id = ? "
                             "AND used_at IS NULL", (runner.created_at, runner.id, token_id))
            if cur.rowcount != 1:
                return "this enrolment token was used already"
            db.execute(f"INSERT INTO runners ({_RUNNER_COLUMNS}) VALUES "
                       f"({', '.join('?' for _ in RunnerRow._fields)})", runner)
            db.execute(f"INSERT INTO runner_sessions ({_SESSION_COLUMNS}) VALUES "
                       "(?, ?, ?, ?, ?)", session)
            for event in events:
                self._append_audit(db, event)
            return None

    def get_runner(self, runner_id: str) -> RunnerRow | None:
        """A runner by id."""
        rows = self._read(f"SELECT {_RUNNER_COLUMNS} FROM runners WHERE id = ?", (runner_id,))
        return RunnerRow(*rows[0]) if rows else None

    def runners(self) -> list[RunnerRow]:
        """Every runner, newest first."""
        return [RunnerRow(*r) for r in self._read(
            f"SELECT {_RUNNER_COLUMNS} FROM runners ORDER BY created_at DESC")]

    def session(self, session_id: str) -> tuple[SessionRow, RunnerRow] | None:
        """A session and its runner."""
        return self.sessions([session_id]).get(session_id)

    def sessions(self, session_ids: list[str]) -> dict[str, tuple[SessionRow, RunnerRow]]:
        """Sessions and their runners, by id (one query: it authenticates every runner
        request of a server's batch)."""
        if not session_ids:
            return {}
        cols = ", ".join(f"s.{c}" for c in SessionRow._fields) + ", " + \
            ", ".join(f"r.{c}" for c in RunnerRow._fields)
        where, args = self._one_of("s.id", session_ids)
        rows = self._read(f"SELECT {cols} FROM runner_sessions s JOIN runners r ON "
                          f"r.id = s.runner_id WHERE {where}", args)
        n = len(SessionRow._fields)
        return {str(row[0]): (SessionRow(*row[:n]), RunnerRow(*row[n:])) for row in rows}

    def attest(self, runner_id: str, status: str, measurements_json: str, now: float,
               session: SessionRow | None, event: AuditEvent) -> bool:
        """Record an attestation of a runner not quarantined: its measurements, its status
        (active, or unattested when the policy refused it) and, if it passed, a new session
        (older ones expire on their own). False if the runner is quarantined or unknown."""
        with self._tx() as db:
            keep = "CASE WHEN status = 'draining' AND ? = 'active' THEN status ELSE ? END"
            cur = db.execute(f"UPDATE runners SET status = {keep}, measurements_json = ?, "
                             "attested_at = ?, last_seen_at = ? WHERE id = ? AND "
                             "status <> 'quarantined'",
                             (status, status, measurements_json, now, now, runner_id))
            if cur.rowcount != 1:
                return False
            if session is not None:
                db.execute(f"INSERT INTO runner_sessions ({_SESSION_COLUMNS}) VALUES "
                           "(?, ?, ?, ?, ?)", session)
            db.execute("DELETE FROM runner_sessions WHERE runner_id = ? AND expires_at < ?",
                       (runner_id, now))
            self._append_audit(db, event)
            return True

    def set_runner_status(self, runner_id: str, status: str, allowed_from: tuple[str, ...],
                          event: AuditEvent) -> bool:
        """Move a runner to ``status`` from one of ``allowed_from``; quarantine also ends its
        sessions. False if it is unknown or in another state."""
        marks = ", ".join("?" for _ in allowed_from)
        with self._tx() as db:
            cur = db.execute(f"UPDATE runners SET status = ? WHERE id = ? AND status IN "
                             f"({marks})", (status, runner_id, *allowed_from))
            if cur.rowcount != 1:
                return False
            if status == "quarantined":
                db.execute("DELETE FROM runner_sessions WHERE runner_id = ?", (runner_id,))
            self._append_audit(db, event)
            return True

    def fail_runner_jobs(self, runner_id: str, now: float,
                         event_for: Callable[[JobRow], AuditEvent]) -> list[JobRow]:
        """Fail (``runner_lost``) every job running on ``runner_id``; their attempts are lost."""
        with self._tx() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'running' AND "
                              "runner_id = ?", (runner_id,)).fetchall()
            jobs = [JobRow(*r) for r in rows]
            for job in jobs:
                self._lose(db, job, False, now)
            for job in jobs:  # after the updates: the audit head is taken last (no deadlock)
                self._append_audit(db, event_for(job))
            return jobs

    def spend_nonce(self, nonce: str, expires_at: float, now: float) -> bool:
        """Record an attestation nonce as used; False if it was used before."""
        with self._tx() as db:
            db.execute("DELETE FROM used_nonces WHERE expires_at < ?", (now,))
            cur = db.execute("INSERT INTO used_nonces (nonce, expires_at) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING", (nonce, expires_at))
            return bool(cur.rowcount == 1)

    def server_secret(self, name: str, make: Callable[[], bytes]) -> bytes:
        """A secret shared by every replica, made once (by whichever asks first)."""
        rows = self._read("SELECT value FROM server_secrets WHERE name = ?", (name,))
        if rows:
            return bytes(rows[0][0])
        with self._tx() as db:
            db.execute("INSERT INTO server_secrets (name, value) VALUES (?, ?) "
                       "ON CONFLICT DO NOTHING", (name, make()))
            return bytes(db.execute("SELECT value FROM server_secrets WHERE name = ?",
                                    (name,)).fetchone()[0])

    # -- log chunks and blobs -------------------------------------------------------------

    def put_log_chunk(self, job_id: str, attempt: int, runner_id: str, seq: int, data: bytes,
                      cap: int) -> str:
        """Store one chunk of an attempt's log: ``stored``, ``duplicate`` (the same chunk was
        stored before: a retry), ``conflict`` (another chunk has that number), ``fenced``
        (the attempt no longer holds the job) or ``full`` (over ``cap`` bytes)."""
        import hashlib  # (per byte faster than stockade.hashing's; not needed at start-up)

        digest = hashlib.sha256(data).hexdigest()
        with self._tx() as db:
            return self._put_chunk(db, (job_id, attempt, seq), runner_id, digest, data, cap)

    @staticmethod
    def _put_chunk(db: Any, key: tuple[str, int, int], runner_id: str, digest: str,
                   data: bytes, cap: int) -> str:
        job_id, attempt, _ = key

        def sent_before() -> str:
            row = db.execute(_CHUNK_SHA, key).fetchone()
            return "duplicate" if row is not None and row[0] == digest else "conflict"

        if db.execute(f"SELECT 1 FROM jobs WHERE id = ? AND {RUNNING}",
                      (job_id, attempt, runner_id)).fetchone() is None:
            row = db.execute(_CHUNK_SHA, key).fetchone()  # a retry after the attempt ended
            return "fenced" if row is None else "duplicate" if row[0] == digest else "conflict"
        if db.execute(_CHUNK_SHA, key).fetchone() is not None:
            return sent_before()
        cur = db.execute("UPDATE attempts SET log_bytes = log_bytes + ? WHERE job_id = ? "
                         "AND attempt = ? AND log_bytes + ? <= ?",
                         (len(data), job_id, attempt, len(data), cap))
        if cur.rowcount != 1:
            return "full"  # nothing written
        cur = db.execute("INSERT INTO log_chunks (job_id, attempt, seq, sha256, data, at) "
                         "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                         (*key, digest, data, time.time()))
        if cur.rowcount != 1:  # a retry racing the first send (PostgreSQL): not counted twice
            db.execute("UPDATE attempts SET log_bytes = log_bytes - ? WHERE job_id = ? AND "
                       "attempt = ?", (len(data), job_id, attempt))
            return sent_before()
        return "stored"

    def log_chunks(self, job_id: str, after: tuple[int, int] = (0, -1),
                   limit: int = 256) -> list[tuple[int, int, bytes]]:
        """``(attempt, seq, data)`` of a job's log after position ``after``, in order."""
        rows = self._read("SELECT attempt, seq, data FROM log_chunks WHERE job_id = ? AND "
                          "(attempt > ? OR (attempt = ? AND seq > ?)) ORDER BY attempt, seq "
                          "LIMIT ?", (job_id, after[0], after[0], after[1], limit))
        return [(int(a), int(s), bytes(d)) for a, s, d in rows]

    def put_blob(self, sha256: str, data: bytes, now: float) -> None:
        """Keep ``data`` under its sha256 (the caller checked it); a second copy is a no-op."""
        with self._tx(head=False) as db:
            db.execute("INSERT INTO blobs (sha256, size, data, created_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT DO NOTHING", (sha256, len(data), data, now))

    def put_upload(self, job_id: str, attempt: int, runner_id: str, sha256: str,
                   data: bytes, now: float) -> bool:
        """Keep bytes an attempt uploaded (the caller checked their sha256) and record that
        this attempt sent them; False (nothing kept) if it no longer holds the job."""
        with self._tx(head=False) as db:
            if db.execute(f"SELECT 1 FROM jobs WHERE id = ? AND {RUNNING}",
                          (job_id, attempt, runner_id)).fetchone() is None:
                return False
            db.execute("INSERT INTO blobs (sha256, size, data, created_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT DO NOTHING", (sha256, len(data), data, now))
            db.execute("INSERT INTO attempt_uploads (job_id, attempt, sha256) VALUES (?, ?, ?) "
                       "ON CONFLICT DO NOTHING", (job_id, attempt, sha256))
            return True

    def uploaded(self, job_id: str, attempt: int) -> dict[str, int]:
        """sha256 → size of the blobs this attempt uploaded."""
        return {str(h): int(n) for h, n in self._read(
            "SELECT u.sha256, b.size FROM attempt_uploads u JOIN blobs b ON b.sha256 = "
            "u.sha256 WHERE u.job_id = ? AND u.attempt = ?", (job_id, attempt))}

    def get_blob(self, sha256: str) -> bytes | None:
        """A blob's bytes (None if there is none)."""
        rows = self._read("SELECT data FROM blobs WHERE sha256 = ?", (sha256,))
        return bytes(rows[0][0]) if rows else None

    def read_blob(self, sha256: str, offset: int, size: int) -> bytes | None:
        """Up to ``size`` bytes of a blob from ``offset`` (``substring``: on PostgreSQL it
        fetches only the slice's chunks of a blob stored out of line, migration 0012)."""
        rows = self._read("SELECT substr(data, ?, ?) FROM blobs WHERE sha256 = ?",
                          (offset + 1, size, sha256))
        return bytes(rows[0][0]) if rows else None

    def has_blob(self, sha256: str) -> int | None:
        """A blob's size, None if there is none."""
        rows = self._read("SELECT size FROM blobs WHERE sha256 = ?", (sha256,))
        return int(rows[0][0]) if rows else None

    def prune_blobs(self, before: float) -> int:
        """Remove blobs older than ``before`` that no job's artifact and no unfinished job's
        workspace refers to; how many went."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM blobs WHERE created_at < ? AND sha256 NOT IN "
                "(SELECT sha256 FROM artifacts) AND sha256 NOT IN (SELECT workspace_sha256 "
                "FROM jobs WHERE workspace_sha256 IS NOT NULL AND status IN "
                "('queued', 'running'))", (before,))
            db.execute("DELETE FROM attempt_uploads WHERE sha256 NOT IN "
                       "(SELECT sha256 FROM blobs)")
            return int(cur.rowcount)
