"""Group commit (``Store.batched``) on both backends: the calls of a batch share one transaction,
yet each gets exactly what it would have got alone; a failing or spoiling call is undone with
the batch and runs alone; a batch of reads takes no write lock; on PostgreSQL, batches on two
connections never deadlock however their calls' rows cross."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from stockade.audit import verify_chain
from stockade.errors import StoreError
from stockade.store.interface import EnrolTokenRow, RunnerRow, SessionRow, Store
from stockade.store.open import open_store
from tests.unit.store.test_fleet_queries import enrolled, ev, job


def claim(store: Store, runner_id: str = "r1"):  # type: ignore[no-untyped-def]
    return lambda: store.claim_attempt(runner_id, lambda j: 1e11,
                                       lambda j: ev("job.claimed", j.id), lambda j: True,
                                       agent=True)


def test_a_batch_hands_each_call_its_own_result_after_one_commit(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    for n in range(4):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))
    out = store.batched([claim(store), claim(store), lambda: store.get_job("j0"),
                         claim(store), claim(store), claim(store)])
    assert all(ok for ok, _ in out)
    taken = [v.id if v else None for (_, v) in out[:2] + out[3:]]
    assert taken == ["j0", "j1", "j2", "j3", None]  # each job once, oldest first
    assert out[2][1].status == "running"  # a read after a write sees it (same transaction)
    assert [a.attempt for n in range(4) for a in store.attempts(f"j{n}")] == [1, 1, 1, 1]
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_a_failing_call_runs_alone_and_the_others_stand(store_url: str) -> None:
    store = open_store(store_url)
    enrolled(store)
    for n in range(3):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))
    runs = {"bad": 0}

    def bad() -> None:
        runs["bad"] += 1
        store.record([ev("written.then.failed")])
        raise ValueError("boom")

    out = store.batched([claim(store), bad, claim(store)])
    assert out[0][0] and out[2][0] and [out[0][1].id, out[2][1].id] == ["j0", "j1"]
    assert not out[1][0] and isinstance(out[1][1], ValueError)
    assert runs["bad"] == 2  # in the batch (undone), then alone
    actions = [e.action for e, _, _ in store.audit_records()]
    # the batch's write undone; alone it runs in a transaction too, undone when it raised
    # (a call that fails leaves nothing half done)
    assert actions.count("job.claimed") == 2 and actions.count("written.then.failed") == 0
    assert [a.attempt for a in store.attempts("j0")] == [1]  # not claimed twice
    store.close()


def test_a_transaction_undone_inside_a_call_undoes_the_batch(store_url: str) -> None:
    """A call whose own transaction ends by an exception it catches: alone, that transaction
    is rolled back; in a batch there is no transaction of its own to roll back, so the batch
    is undone and the call runs alone (what it wrote in the batch must not stay)."""
    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j0", 0.0), ev("job.admitted", "j0"))

    def caught() -> str:
        try:
            with store._tx() as db:  # type: ignore[attr-defined]
                store._append_audit(db, ev("must.not.stay"))  # type: ignore[attr-defined]
                raise KeyError("undo")
        except KeyError:
            return "caught"

    out = store.batched([claim(store), caught, lambda: store.get_job("j0")])
    assert out == [(True, out[0][1]), (True, "caught"), (True, out[2][1])]
    assert out[0][1].id == "j0" and out[2][1].status == "running"
    assert "must.not.stay" not in [e.action for e, _, _ in store.audit_records()]
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_a_statement_refused_by_the_database_fails_its_call_alone(store_url: str) -> None:
    """A write the database refuses (a job id that exists) whose result nobody reads: on
    PostgreSQL its error comes back only with a later statement or the commit (pipeline
    mode), yet it is its call that fails, with the database's reason, and the calls beside it
    stand; nothing of a failed transaction stays, and the store goes on."""
    store = open_store(store_url)
    enrolled(store)
    for n in range(2):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))
    before = len(store.audit_records())
    again = job("j1", 5.0)
    out = store.batched([claim(store), lambda: store.insert_job(again, ev("job.admitted")),
                         claim(store), lambda: store.record([ev("after")])])
    assert [ok for ok, _ in out] == [True, False, True, True]
    # (on PostgreSQL the claim that read next ran alone first: the error came back to it)
    assert sorted([out[0][1].id, out[2][1].id]) == ["j0", "j1"]
    assert isinstance(out[1][1], StoreError) and "unique" in str(out[1][1]).lower()
    actions = [e.action for e, _, _ in store.audit_records()[before:]]
    assert sorted(actions) == ["after", "job.claimed", "job.claimed"]
    # alone too (no batch): a later statement says so, nothing of it stands
    with pytest.raises(StoreError, match=r"(?i)unique"):
        store.insert_job(again, ev("job.admitted.twice"))
    assert "job.admitted.twice" not in [e.action for e, _, _ in store.audit_records()]

    def no_event() -> None:  # nothing sent after the refused insert: the commit says it
        with store._tx() as db:  # type: ignore[attr-defined]
            db.execute("UPDATE runners SET name = 'changed'")
            db.execute(f"INSERT INTO runner_sessions ({', '.join(SessionRow._fields)}) "
                       "VALUES ('s1', 'r1', 'x', 1.0, 2.0)")

    out = store.batched([no_event, no_event])
    assert all(not ok and isinstance(e, StoreError) for ok, e in out)
    with pytest.raises(StoreError, match=r"(?i)unique|duplicate"):
        no_event()
    assert store.get_runner("r1").name == "box"  # type: ignore[union-attr]
    store.record([ev("still.working")])
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_a_batchs_events_are_chained_at_its_end_in_call_order(store_url: str) -> None:
    """The events of a batch's calls are appended together when its calls are done (more of
    them than one insert takes, too): in the order the calls made them, one chain, and the
    head record moved to the last of them."""
    store = open_store(store_url)
    enrolled(store)
    for n in range(3):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))
    before = len(store.audit_records())
    calls = [claim(store)] + [
        (lambda i=i: store.record([ev(f"e{i}.a"), ev(f"e{i}.b")])) for i in range(40)
    ] + [claim(store)]
    out = store.batched(calls)
    assert all(ok for ok, _ in out)
    records = store.audit_records()
    actions = [e.action for e, _, _ in records[before:]]
    assert actions == ["job.claimed"] + [f"e{i}.{x}" for i in range(40) for x in "ab"] \
        + ["job.claimed"]
    assert verify_chain(records) is None
    snapshot = store.audit_snapshot()
    assert snapshot.db_head == (len(records), records[-1][2])
    if snapshot.file_head is not None:  # SQLite's copy outside the database too
        assert snapshot.file_head == snapshot.db_head
    store.close()


def test_a_call_in_a_batch_reads_the_events_it_appended(store_url: str) -> None:
    """Events wait for the batch's end, except when a call reads the trail: it sees what it
    (and the calls before it) appended, as it would alone."""
    store = open_store(store_url)
    enrolled(store)
    store.insert_job(job("j0", 0.0), ev("job.admitted", "j0"))

    def record_then_read() -> list[str]:
        store.record([ev("mine")])
        return [e.action for e, _, _ in store.audit_records()][-3:]

    out = store.batched([claim(store), record_then_read, lambda: store.record([ev("later")])])
    assert out[1][0] and out[1][1][-2:] == ["job.claimed", "mine"]
    actions = [e.action for e, _, _ in store.audit_records()]
    assert actions[-3:] == ["job.claimed", "mine", "later"]
    assert verify_chain(store.audit_records()) is None
    store.close()


def test_a_batch_of_reads_takes_no_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "stockade.db"
    store = open_store(str(db))
    enrolled(store)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writes, for a while
    try:
        t = time.monotonic()
        out = store.batched([lambda: store.session("s1"), lambda: store.get_job("nope"),
                             claim(store)])  # nothing queued: the claim only reads
        assert time.monotonic() - t < 1.0
        assert out[0][1] is not None and out[1][1] is None and out[2][1] is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.close()


def test_replicas_batches_never_deadlock_on_postgresql(database_url: str) -> None:
    """Two connections run batches whose calls update the same runners' and jobs' rows in
    opposite orders (heartbeats of two runners with two jobs each): PostgreSQL detects no
    deadlock, every heartbeat lands."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the SQLite store writes one transaction at a time")
    stores = [open_store(database_url) for _ in range(2)]
    store = stores[0]
    enrolled(store)
    for n in range(4):
        store.insert_job(job(f"j{n}", float(n), runner_id="r1"), ev("job.admitted", f"j{n}"))
    held = [store.claim_attempt("r1", lambda j: 1e11, lambda j: ev("c", j.id), lambda j: True)
            for _ in range(4)]
    assert all(held)

    def beat(s: Store, job_id: str):  # type: ignore[no-untyped-def]
        return lambda: s.extend_lease(job_id, 1, "r1", 2e11)

    failures: list[BaseException] = []

    def hammer(s: Store, order: list[str]) -> None:
        try:
            for _ in range(60):
                out = s.batched([beat(s, j) for j in order] + [
                    lambda: s.record([ev("runner.reported")])])
                assert all(ok and v in ((True, False), None) for ok, v in out), out
        except BaseException as e:
            failures.append(e)

    before = _deadlocks(database_url)
    threads = [threading.Thread(target=hammer, args=(stores[0], ["j0", "j1", "j2", "j3"])),
               threading.Thread(target=hammer, args=(stores[1], ["j3", "j2", "j1", "j0"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert _deadlocks(database_url) == before
    assert verify_chain(store.audit_records()) is None
    for s in stores:
        s.close()


def test_a_quarantine_beside_a_batch_never_deadlocks_on_postgresql(database_url: str) -> None:
    """A batch that writes (a heartbeat) then marks an idle runner seen (its claim) holds the
    audit head and then that runner's row; a quarantine of the runner on another connection,
    in its own transaction, takes the head before the runner's row too: it waits, then wins,
    and no deadlock is detected."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the SQLite store writes one transaction at a time")
    import psycopg

    a, b = open_store(database_url), open_store(database_url)
    enrolled(a, "r1")
    token = EnrolTokenRow("t2", "default", "ab" * 32, 1.0, 1e12, None, None)
    a.insert_enrol_token(token, ev("enrol_token.created"))
    assert a.enrol("t2", lambda row: None, RunnerRow("r2", "box", "default", "[]", 2, "k" * 44,
                                                     "active", "{}", None, 2.0, None),
                   SessionRow("s2", "r2", "cd" * 32, 2.0, 1e12), [ev("runner.enrolled")]) is None
    a.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    assert claim(a, "r1")() is not None  # the queue is empty now
    outcome: dict[str, object] = {}

    def quarantine() -> None:
        outcome["b"] = b.set_runner_status("r2", "quarantined", ("active",),
                                           ev("runner.quarantined"))

    def start_quarantine() -> str:  # inside the batch, after its heartbeat: B must wait
        t = threading.Thread(target=quarantine)
        t.start()
        outcome["thread"] = t
        with psycopg.connect(database_url, autocommit=True) as conn:
            for _ in range(250):
                if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                                "'Lock' AND datname = current_database()").fetchone()[0]:
                    return "waiting"
                time.sleep(0.02)
        return "never waited"

    before = _deadlocks(database_url)
    out = a.batched([lambda: a.extend_lease("j1", 1, "r1", 2e11), start_quarantine,
                     claim(a, "r2")])
    thread = outcome["thread"]
    assert isinstance(thread, threading.Thread)
    thread.join(30)
    assert out == [(True, (True, False)), (True, "waiting"), (True, None)]
    assert outcome["b"] is True and a.get_runner("r2").status == "quarantined"  # type: ignore[union-attr]
    assert _deadlocks(database_url) == before
    assert verify_chain(a.audit_records()) is None
    a.close()
    b.close()


def test_a_batch_whose_connection_is_lost_runs_its_other_calls_on_another(database_url: str
                                                                          ) -> None:
    """A batch's connection killed under it (a failover, an administrator): the calls run
    again alone, on a connection from the pool; each job is claimed once."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL connection")
    import psycopg

    store = open_store(database_url)
    enrolled(store)
    for n in range(4):
        store.insert_job(job(f"j{n}", float(n)), ev("job.admitted", f"j{n}"))

    kills = []

    def kill_own_connection_once() -> str:
        if not kills:
            with store._tx() as db:  # type: ignore[attr-defined]
                kills.append(db.execute("SELECT pg_backend_pid()").fetchone()[0])
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s, 10000)", (kills[0],))
        return "done"

    out = store.batched([claim(store), kill_own_connection_once, claim(store), claim(store)])
    assert kills and all(ok for ok, _ in out), out
    taken = sorted(v.id for ok, v in out if hasattr(v, "id"))
    assert taken == ["j0", "j1", "j2"]  # each once: the undone batch claimed nothing
    assert sorted(a.job_id for n in range(4) for a in store.attempts(f"j{n}")) == taken
    assert verify_chain(store.audit_records()) is None
    store.close()


def _deadlocks(url: str) -> int:
    import psycopg

    time.sleep(0.6)  # the statistics collector's report interval (500 ms)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = "
                           "current_database()").fetchone()
    return int(row[0]) if row else 0


def test_a_database_that_stays_locked_fails_every_call(tmp_path: Path) -> None:
    db = tmp_path / "stockade.db"
    store = open_store(str(db))
    enrolled(store)
    store.insert_job(job("j0", 0.0), ev("job.admitted", "j0"))
    store._db.execute("PRAGMA busy_timeout = 100")  # type: ignore[attr-defined]
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        out = store.batched([claim(store), lambda: store.record([ev("x")])])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [ok for ok, _ in out] == [False, False]
    assert all(isinstance(v, StoreError) for _, v in out)
    store.close()


def test_a_claim_reads_the_head_of_the_queue_not_all_of_it(database_url: str) -> None:
    """A queue that grew faster than PostgreSQL's statistics (a fresh burst of submissions):
    the claim's query walks the queue index and stops after a few rows; it does not read and
    sort every queued job (2-3 ms of the database's CPU per claim at a few thousand)."""
    from stockade.store.fleet import _JOB_COLUMNS

    store = open_store(database_url)
    enrolled(store)
    for n in range(3000):
        store.insert_job(job(f"j{n:05d}", float(n)), ev("job.admitted", f"j{n:05d}"))
    for _ in range(40):  # a queue being drained
        store.batched([claim(store) for _ in range(16)])
    with store._pool.connection() as conn:  # type: ignore[attr-defined]
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN ANALYZE SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'queued' AND "
            "(runner_id IS NULL OR runner_id = 'r1') AND (created_at, id) > (-1.0, '') "
            "ORDER BY created_at, id LIMIT 14 FOR UPDATE SKIP LOCKED").fetchall())
        conn.rollback()
        # (the planner's choice depends on statistics the test cannot age like a busy queue's:
        # what makes it safe is that the store's connections never take a bitmap scan)
        assert conn.execute("SHOW enable_bitmapscan").fetchone() == ("off",)
    assert "Index Scan" in plan and "Bitmap" not in plan and "Sort" not in plan, plan
    store.close()
