"""Claims and completions on PostgreSQL as sets: all the claims of a batch (a server's
concurrent requests, see ``SqlStore.batched``) take their jobs in one statement, all its
completions end their attempts in one. Each statement passes its rows as arrays (``unnest``),
so that its text and its number of parameters stay the same whatever the batch's size and
psycopg keeps it prepared; one claim or one completion alone is a set of one.

A batch's completions and the claims they bring go in one transaction
(:meth:`SetQueries.finish_and_claim`): the completions' statements and the claims' first page
of candidates are sent together, so that the audit head, locked with them, is held for two
round trips (then the take, the events and the commit).

A mixin of :class:`~stockade.store.postgres.PostgresStore`, before ``FleetQueries`` (whose
one-by-one versions these replace); the batch's transaction has locked the audit head first,
as every write transaction does, so the rows of runners and jobs these lock in no set order
cannot deadlock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING, Any

from stockade.store.fleet import ATTEMPT_COLUMNS, CLAIM_BATCHES
from stockade.store.interface import (
    ArtifactRow,
    ClaimRequest,
    FinishRequest,
    JobRow,
    LeaseRow,
    Revocation,
    StepRow,
)

if TYPE_CHECKING:
    from stockade.audit import AuditEvent

_JOB_COLUMNS = ", ".join(JobRow._fields)
_CREATED = JobRow._fields.index("created_at")
# the columns a completion may change, with their types in arrays
_CHANGED = {"status": "text", "failure_reason": "text", "exit_code": "int",
            "finished_at": "float8", "lease_expires_at": "float8", "result_json": "text"}
# in the queue's order: the queue index, whatever the planner thinks of the queue's length
# (a queue that drained looked long: a scan of the whole table for each claim)
_ANY_QUEUED = ("SELECT 1 FROM jobs WHERE status = 'queued' AND (runner_id IS NULL OR "
               "runner_id = ANY(?::text[])) ORDER BY created_at, id LIMIT 1")
# the runners that may claim (agents while active; the control plane's own, which have no
# row, in any case), in the statement of the first page of candidates (one round trip less):
# read, not locked (every write transaction holds the audit head first, so none changes them
# while a claim runs), and marked seen once a second at most (each mark is a row version: at
# a fleet's rate of claims, a table of dead rows that every claim scanned)
_SEEN = ("WITH seen AS (SELECT id FROM runners WHERE id = ANY(?::text[]) AND status = "
         "'active'), touch AS (UPDATE runners SET last_seen_at = ? WHERE ((id = ANY(?::text[]) "
         "AND status = 'active') OR id = ANY(?::text[])) AND (last_seen_at IS NULL OR "
         "last_seen_at < ?) RETURNING 1) ")
_ACTIVE = "(SELECT array_agg(id) FROM seen)"  # agents that may claim
SEEN_EVERY_S = 1.0  # how often a runner's last_seen_at moves at most
_TAKE = (
    "WITH v AS (SELECT * FROM unnest(?::text[], ?::int[], ?::text[], ?::float8[], ?::float8[], "
    "?::text[], ?::int[]) AS v (id, attempt, runner_id, lease, started, after_job, "
    "after_attempt)), "
    # by id: the jobs are queued and locked by this transaction since its page (the queue
    # index's estimate of queued jobs lags a burst of submissions: a plan that read them all)
    "j AS (UPDATE jobs SET status = 'running', runner_id = v.runner_id, attempt = v.attempt, "
    "lease_expires_at = v.lease, started_at = v.started FROM v WHERE jobs.id = v.id AND "
    "jobs.id = ANY(?::text[]) RETURNING jobs.id), "
    f"a AS (INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT v.id, v.attempt, v.runner_id, "
    "v.started, NULL, 'running', 0 FROM v JOIN j ON j.id = v.id RETURNING 1), "
    # the attempt whose completion claims the job remembers it
    "n AS (UPDATE attempts SET next_job_id = v.id, next_attempt = v.attempt FROM v JOIN j ON "
    "j.id = v.id WHERE attempts.job_id = v.after_job AND attempts.attempt = v.after_attempt "
    "AND attempts.runner_id = v.runner_id RETURNING 1) "
    "SELECT 1")  # (a statement's CTEs that change rows run whether it reads them or not)
_STEPS = ("INSERT INTO steps (job_id, idx, name, status, exit_code, duration_s) SELECT * FROM "
          "unnest(?::text[], ?::int[], ?::text[], ?::text[], ?::int[], ?::float8[])")
_ARTIFACTS = ("INSERT INTO artifacts (job_id, path, sha256, size) SELECT * FROM "
              "unnest(?::text[], ?::text[], ?::text[], ?::int8[])")


class SetQueries:
    """Claims and completions as sets (see the module docstring)."""

    if TYPE_CHECKING:  # the base store's
        def _tx(self, head: bool = True) -> AbstractContextManager[Any]: ...

        def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]: ...

        def _writing(self) -> bool: ...

        def _append_all(self, db: Any, events: list[AuditEvent]) -> None: ...

    def claim_attempt(self, runner_id: str, lease_until: Callable[[JobRow], float],
                      event_for: Callable[[JobRow], AuditEvent],
                      eligible: Callable[[JobRow], bool], agent: bool = False,
                      after: tuple[str, int] | None = None) -> JobRow | None:
        """One claim (``FleetQueries.claim_attempt``): a set of one."""
        return self.claim_attempts([ClaimRequest(runner_id, lease_until, event_for, eligible,
                                                 agent, after)])[0]

    def claim_attempts(self, requests: list[ClaimRequest]) -> list[JobRow | None]:
        """Each request's oldest eligible queued job, in order (an earlier request takes the
        older job), all in one transaction: the runners seen (an agent that is not active
        takes nothing), the queue's head locked page by page, skipping jobs another
        transaction is taking, then every job taken in one statement."""
        ids = sorted({r.runner_id for r in requests})
        if not requests or (not self._writing() and not self._read(_ANY_QUEUED, (ids,))):
            return [None] * len(requests)  # nothing to take: no write transaction
        with self._tx() as db:
            return self._claim(db, requests, _pages(db, requests, time.time()),
                               [True] * len(requests))

    def finish_and_claim(self, finishes: list[FinishRequest], claims: list[ClaimRequest],
                         after: list[int | None]) -> tuple[list[bool], list[JobRow | None]]:
        """``Store.finish_and_claim`` in one transaction and two round trips while it holds
        the audit head: the completions' statements and the claims' first page of candidates
        travel together (a claim whose completion turns out fenced then takes nothing), then
        the takes, the events and the commit."""
        if not finishes or not claims:
            return self.finish_attempts(finishes), self.claim_attempts(claims)
        with self._tx() as db:
            sent = _send_finishes(db, finishes)
            pages = _pages(db, claims, time.time())
            held = self._finish_sent(db, finishes, sent)
            return held, self._claim(db, claims, pages,
                                     [a is None or held[a] for a in after])

    def _claim(self, db: Any, requests: list[ClaimRequest],
               pages: Iterator[tuple[set[str], list[JobRow]]], usable: list[bool]
               ) -> list[JobRow | None]:
        """The claims of ``requests`` that are ``usable``, from ``pages`` of candidates."""
        now = time.time()
        seen, first = next(pages)
        out = _assign(requests, [i for i, r in enumerate(requests)
                                 if usable[i] and (not r.agent or r.runner_id in seen)],
                      chain([first], (rows for _, rows in pages)))
        claimed = [(i, self._claimed(requests[i], job, now))
                   for i, job in enumerate(out) if job is not None]
        if not claimed:
            return out
        rows = [(job.id, job.attempt, job.runner_id, _float(job.lease_expires_at),
                 _float(job.started_at), *(requests[i].after or (None, None)))
                for i, job in claimed]
        # not read (sent with the commit): it takes them all, locked since the page (or an
        # attempt already there is a key violation, and the transaction is undone)
        columns = [list(c) for c in zip(*rows, strict=True)]
        db.execute(_TAKE, [*columns, columns[0]])
        for i, job in claimed:
            out[i] = job
        self._append_all(db, [requests[i].event_for(job) for i, job in claimed])
        return out

    @staticmethod
    def _claimed(request: ClaimRequest, job: JobRow, now: float) -> JobRow:
        return job._replace(status="running", runner_id=request.runner_id,
                            attempt=job.attempt + 1, lease_expires_at=request.lease_until(job),
                            started_at=now)

    def finish_attempt(self, job_id: str, attempt: int, runner_id: str,
                       changes: dict[str, Any], steps: list[StepRow],
                       artifacts: list[ArtifactRow], events: list[AuditEvent],
                       revoke: Revocation | None = None) -> bool:
        """One attempt's end (``FleetQueries.finish_attempt``): a set of one."""
        return self.finish_attempts([FinishRequest(job_id, attempt, runner_id, changes, steps,
                                                   artifacts, events, revoke)])[0]

    def finish_attempts(self, requests: list[FinishRequest]) -> list[bool]:
        """Record each attempt's outcome, steps and artifacts if it still holds its job, and
        revoke its live leases when it asks: one statement for all the jobs, their attempts
        and their leases (one for each kind of ``changes``, and another round for a job
        named twice), one for all the steps, one for all the artifacts; the audit events in
        the requests' order, each request's own then its leases' revocations."""
        if not requests:
            return []
        with self._tx() as db:
            return self._finish_sent(db, requests, _send_finishes(db, requests))

    def _finish_sent(self, db: Any, requests: list[FinishRequest],
                sent: list[tuple[list[int], Any]]) -> list[bool]:
        """The rest of :meth:`finish_attempts` once its statements are ``sent``."""
        held: list[list[LeaseRow] | None] = [None] * len(requests)
        for group, result in sent:
            revoked = {job_id: [_lease(x) for x in (leases or ())]
                       for job_id, leases in result.fetchall()}
            for i in group:
                held[i] = revoked.get(requests[i].job_id)
        done = [(r, leases) for r, leases in zip(requests, held, strict=True)
                if leases is not None]
        again = [r.job_id for r, _ in done if r.attempt > 1]
        if again:  # what a lost attempt may have left
            db.execute("DELETE FROM steps WHERE job_id = ANY(?::text[])", (again,))
            db.execute("DELETE FROM artifacts WHERE job_id = ANY(?::text[])", (again,))
        steps = [(r.job_id, *s) for r, _ in done for s in r.steps]
        if steps:
            db.execute(_STEPS, [list(c) for c in zip(*steps, strict=True)])
        artifacts = [(r.job_id, *a) for r, _ in done for a in r.artifacts]
        if artifacts:
            db.execute(_ARTIFACTS, [list(c) for c in zip(*artifacts, strict=True)])
        events: list[AuditEvent] = []
        for r, leases in done:
            events += r.events
            if r.revoke is not None:
                events += [r.revoke.event_for(lease) for lease in leases]
        self._append_all(db, events)
        return [leases is not None for leases in held]


def _send_finishes(db: Any, requests: list[FinishRequest]) -> list[tuple[list[int], Any]]:
    """The statements that end the attempts of ``requests``, sent (not read): the indexes
    of the requests of each, and its result."""
    sent = []
    for group in _rounds(requests):
        keys = tuple(requests[group[0]].changes)
        sent.append((group, db.execute(_finish_sql(keys), _finish_columns(
            [requests[i] for i in group], keys))))
    return sent


def _assign(requests: list[ClaimRequest], waiting: list[int], pages: Iterable[list[JobRow]]
            ) -> list[JobRow | None]:
    """The job of each ``waiting`` request: the first of the candidates, read page by page
    while some request has none, that it may take and an earlier request did not take."""
    out: list[JobRow | None] = [None] * len(requests)
    pool: list[JobRow] = []
    taken: set[str] = set()
    looked = dict.fromkeys(waiting, 0)  # the candidates each request has looked at
    for page in pages if waiting else ():
        pool += page
        for i in waiting:
            while out[i] is None and looked[i] < len(pool):
                job = pool[looked[i]]
                looked[i] += 1
                if job.id not in taken and requests[i].eligible(job):
                    taken.add(job.id)
                    out[i] = job
        waiting = [i for i in waiting if out[i] is None]
        if not waiting:
            break
    return out


def _pages(db: Any, requests: list[ClaimRequest], now: float
           ) -> Iterator[tuple[set[str], list[JobRow]]]:
    """Pages of the queued jobs the runners of ``requests`` may take, oldest first, locked
    (skipping those another transaction is taking): twice as many as the requests first,
    then as a claim's (``CLAIM_BATCHES``), until the queue ends; with the first, those of
    the runners that are active agents, and every runner seen ``now`` (:data:`_SEEN`; none
    known if the queue is empty). The first page's statement is sent at once, and read when
    the first page is. Its ``LIMIT`` is written out (a planner that knows it reads the head of
    the queue index): a statement for each size of the first page (one per batch size)."""
    ids = sorted({r.runner_id for r in requests})
    agents = sorted({r.runner_id for r in requests if r.agent})
    others = sorted({r.runner_id for r in requests if not r.agent})
    size = max(2, 2 * len(requests))
    first = db.execute(first_page_sql(size), (agents, now, agents, others, now - SEEN_EVERY_S,
                                              ids))
    return _read_pages(db, ids, first, size)


@lru_cache(maxsize=128)
def first_page_sql(size: int) -> str:
    """The statement of :func:`_pages`' first page of ``size`` candidates."""
    return (f"{_SEEN}SELECT {_ACTIVE}, {_JOB_COLUMNS} FROM jobs WHERE status = 'queued' AND "
            f"(runner_id IS NULL OR runner_id = ANY(?::text[])) ORDER BY created_at, id LIMIT "
            f"{size} FOR UPDATE OF jobs SKIP LOCKED")


def _read_pages(db: Any, ids: list[str], result: Any, size: int
                ) -> Iterator[tuple[set[str], list[JobRow]]]:
    """The pages of :func:`_pages`, the first one's statement sent (its ``result``)."""
    rows = result.fetchall()
    yield set(rows[0][0] or ()) if rows else set(), [JobRow(*r[1:]) for r in rows]
    for more in CLAIM_BATCHES[1:]:
        if len(rows) < size:
            return  # the queue ended
        size = more
        # the position as one row comparison: an index range that stops after ``size`` rows
        rows = db.execute(
            f"SELECT NULL, {_JOB_COLUMNS} FROM jobs WHERE status = 'queued' AND (runner_id IS "
            f"NULL OR runner_id = ANY(?::text[])) AND (created_at, id) > (?, ?) ORDER BY "
            f"created_at, id LIMIT {size} FOR UPDATE OF jobs SKIP LOCKED",
            (ids, rows[-1][1 + _CREATED], rows[-1][1])).fetchall()
        yield set(), [JobRow(*r[1:]) for r in rows]


def _rounds(requests: list[FinishRequest]) -> list[list[int]]:
    """The requests' indexes in groups of one statement each: the same kind of ``changes``,
    and no job twice (an UPDATE ... FROM changes a row once, whichever of its matches)."""
    rounds: list[tuple[tuple[str, ...], set[str], list[int]]] = []
    for i, r in enumerate(requests):
        keys = tuple(r.changes)
        target = next((g for g in rounds if g[0] == keys and r.job_id not in g[1]), None)
        if target is None:
            target = (keys, set(), [])
            rounds.append(target)
        target[1].add(r.job_id)
        target[2].append(i)
    return [g[2] for g in rounds]


@lru_cache(maxsize=64)
def _finish_sql(keys: tuple[str, ...]) -> str:
    """The statement that ends a set of attempts whose ``changes`` have these keys."""
    unknown = [k for k in keys if k not in _CHANGED]
    if unknown:
        raise ValueError(f"a completion does not change {unknown}")
    names = ("id", "attempt", "runner_id", "outcome", "revoke_at", *keys)
    types = ("text", "int", "text", "text", "float8", *(_CHANGED[k] for k in keys))
    sets = ", ".join(f"{k} = v.{k}" for k in keys)
    return (
        f"WITH v AS (SELECT * FROM unnest({', '.join(f'?::{t}[]' for t in types)}) AS v "
        f"({', '.join(names)})), "
        # by id: the status compared as an expression, which no index has (the queue index's
        # estimate of running jobs lags: a plan that read them all, for each request)
        f"j AS (UPDATE jobs SET {sets} FROM v WHERE jobs.id = ANY(?::text[]) AND jobs.id = v.id "
        "AND (jobs.status || '') = 'running' AND jobs.attempt = v.attempt AND jobs.runner_id = "
        "v.runner_id AND v.runner_id NOT IN (SELECT id FROM runners WHERE status = "
        "'quarantined') RETURNING jobs.id), "
        "a AS (UPDATE attempts SET ended_at = ?, outcome = v.outcome FROM v JOIN j ON "
        "j.id = v.id WHERE attempts.job_id = v.id AND attempts.attempt = v.attempt "
        "RETURNING 1), "
        "l AS (UPDATE leases SET revoked_at = v.revoke_at FROM v JOIN j ON j.id = v.id WHERE "
        "v.revoke_at IS NOT NULL AND leases.job_id = v.id AND leases.attempt = v.attempt AND "
        "leases.revoked_at IS NULL RETURNING leases.*) "
        "SELECT j.id, (SELECT json_agg(row_to_json(l) ORDER BY l.id) FROM l WHERE "
        "l.job_id = j.id) FROM j")


def _finish_columns(requests: list[FinishRequest], keys: tuple[str, ...]) -> list[Any]:
    """The arrays of :func:`_finish_sql`'s statement, the jobs' ids again, then the attempts'
    end time."""
    floats = [_CHANGED[k] == "float8" for k in keys]
    rows = [(r.job_id, r.attempt, r.runner_id, r.changes.get("status", "finished"),
             None if r.revoke is None else _float(r.revoke.at),
             *(_float(r.changes[k]) if f else r.changes[k] for k, f in zip(keys, floats,
                                                                           strict=True)))
            for r in requests]
    columns = [list(c) for c in zip(*rows, strict=True)]
    return [*columns, columns[0], time.time()]


def _lease(row: dict[str, Any]) -> LeaseRow:
    """A lease row from its JSON (a whole number of seconds comes back an int)."""
    lease = LeaseRow(*(row[f] for f in LeaseRow._fields))
    return lease._replace(issued_at=float(lease.issued_at), expires_at=float(lease.expires_at),
                          revoked_at=_float(lease.revoked_at))


def _float(value: Any) -> Any:
    """``value`` as a float (psycopg refuses a list of ints and floats), None as it is."""
    return None if value is None else float(value)
