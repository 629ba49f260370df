"""PostgreSQL write transactions in pipeline mode (``store/postgres.py``): a statement's error
comes back with a later statement, a later read or the commit, yet a batch still fails only
the call at fault, reports no call as done whose writes were undone, leaves its connection
outside any transaction, and keeps the audit chain whole with two replicas writing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from stockade.audit import verify_chain
from stockade.errors import StoreError
from stockade.store.interface import SessionRow
from stockade.store.postgres import PostgresStore
from stockade.store.sql import Db
from tests.unit.store.test_batches import claim
from tests.unit.store.test_fleet_queries import enrolled, ev, job

# a stand-in for a deadlock or a canceled statement, raised by the insert of a claim's event
_FAULT = """
CREATE TABLE fault (armed boolean NOT NULL);
INSERT INTO fault VALUES (false);
CREATE FUNCTION fault_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.action = 'job.claimed' AND (SELECT armed FROM fault) THEN
    RAISE EXCEPTION 'stand-in failure' USING ERRCODE = '{state}';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER fault_t BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION fault_fn();
"""


def test_a_lock_timeout_at_the_commit_fails_only_the_call_at_fault(database_url: str) -> None:
    """The claim's take waits past lock_timeout (an operator holds a lock): its error comes
    back with the commit; the call beside it in the batch stands."""
    store = PostgresStore(database_url + "?options=-c%20lock_timeout%3D300")
    enrolled(store)
    store.insert_job(job("j0", 0.0), ev("job.admitted", "j0"))
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("LOCK TABLE attempts IN SHARE MODE")
        out = store.batched([lambda: store.record([ev("innocent")]), claim(store)])
        other.execute("ROLLBACK")
    assert out[0] == (True, None)
    assert not out[1][0] and isinstance(out[1][1], StoreError) and "lock" in str(out[1][1])
    assert "innocent" in [e.action for e, _, _ in store.audit_records()]
    assert store.get_job("j0").status == "queued"  # type: ignore[union-attr]
    store.close()


@pytest.mark.parametrize("state", ["40P01", "57014"])
def test_a_failed_commit_leaves_no_transaction_behind(database_url: str, state: str) -> None:
    """A deadlock or a canceled statement (psycopg's OperationalError, not a lost connection)
    at a call's commit: that call fails, and the batch's connection is out of the failed
    transaction for the calls run after it."""
    store = PostgresStore(database_url)
    enrolled(store)
    store.insert_job(job("j0", 0.0), ev("job.admitted", "j0"))
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(_FAULT.replace("{state}", state))

    def arm_then_insert_twice() -> None:  # the batch fails at its end: each call alone
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("UPDATE fault SET armed = true")
        store.insert_job(job("j0", 5.0), ev("job.admitted.again"))

    out = store.batched([claim(store), lambda: store.get_runner("r1"), arm_then_insert_twice])
    assert not out[0][0] and "stand-in failure" in str(out[0][1])
    assert out[1][0] and out[1][1].id == "r1"
    assert not out[2][0] and "duplicate" in str(out[2][1])
    assert store.get_job("j0").status == "queued"  # type: ignore[union-attr]
    store.close()


def test_a_call_that_catches_another_calls_error_fails_no_one_silently(database_url: str
                                                                       ) -> None:
    """The error of a statement nobody read comes back in another call's read, which catches
    it and goes on: the database would answer COMMIT by undoing everything; no call may be
    reported done whose writes were undone."""
    store = PostgresStore(database_url)
    enrolled(store)

    def writer() -> str:  # appends no event: nothing is sent between its error and COMMIT
        with store._tx() as db:
            db.execute("UPDATE runners SET name = 'changed'")
            db.execute(f"INSERT INTO runner_sessions ({', '.join(SessionRow._fields)}) "
                       "VALUES ('s1', 'r1', 'x', 1.0, 2.0)")  # refused, not read
        return "written"

    def tolerant_reader() -> object:
        try:
            return store.get_runner("r1")
        except StoreError as e:
            return f"caught: {e.message}"

    out = store.batched([writer, tolerant_reader])
    assert not out[0][0] and "duplicate" in str(out[0][1])
    assert out[1][0] and out[1][1].name == "box"  # alone, it read what stands
    assert store.get_runner("r1").name == "box"  # type: ignore[union-attr]
    store.close()


def test_two_replicas_with_refused_statements_keep_one_chain(database_url: str) -> None:
    """Six threads on two stores (replicas) run batches of claims, events and reads, every
    third with an insert the database refuses: no other call fails, every job is claimed
    once, no refused call's event stays, and the chain and its head agree."""
    stores = [PostgresStore(database_url), PostgresStore(database_url)]
    enrolled(stores[0])
    for n in range(300):
        stores[0].insert_job(job(f"j{n:04}", float(n)), ev("job.admitted", f"j{n:04}"))
    errors: list[BaseException] = []
    unexpected: list[str] = []

    def work(i: int) -> None:
        s = stores[i % 2]
        try:
            for k in range(40):
                calls = [claim(s), lambda i=i, k=k: s.record([ev(f"t{i}.{k}")]),
                         lambda: s.get_job("j0000")]
                if k % 3 == 0:
                    calls.insert(1, lambda: s.insert_job(job("j0001", 1.0), ev("dup")))
                for ok, value in s.batched(calls):
                    if not ok and "duplicate key" not in str(value):
                        unexpected.append(repr(value))
        except BaseException as e:  # handed to the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not unexpected, (errors[:3], unexpected[:3])
    records = stores[1].audit_records()
    assert verify_chain(records) is None
    assert stores[1].audit_snapshot().db_head == (len(records), records[-1][2])
    claimed = [a for n in range(300) for a in stores[1].attempts(f"j{n:04}")]
    running = [j for j in stores[1].list_jobs(1000) if j.status == "running"]
    assert len(claimed) == len(running) and all(a.attempt == 1 for a in claimed)
    actions = [e.action for e, _, _ in records]
    assert actions.count("dup") == 0 and actions.count("job.claimed") == len(claimed)
    for s in stores:
        s.close()


def test_a_statement_prepared_in_an_aborted_pipeline_is_not_taken_for_prepared(
        database_url: str) -> None:
    """A statement run for the sixth time is prepared by psycopg (past its threshold) in the
    pipeline of a transaction whose earlier statement the database refused: the server skips
    that preparation, and psycopg 3.3 takes the statement for prepared all the same (its
    ROLLBACK clears what it knows of prepared statements only now and then). The transactions
    after it on that connection must not fail with 'prepared statement does not exist'."""
    store = PostgresStore(database_url, pool_size=1)  # one connection: the same one again
    enrolled(store)
    look = "SELECT count(*) FROM jobs WHERE id = ?"

    def refused(then: Callable[[Db], object] = lambda db: None) -> None:
        with pytest.raises(StoreError, match="duplicate key"), store._tx() as db:
            db.execute(f"INSERT INTO runner_sessions ({', '.join(SessionRow._fields)}) "
                       "VALUES ('s1', 'r1', 'x', 1.0, 2.0)")  # refused (not read)
            then(db)

    refused()
    refused()  # with nothing prepared: psycopg counts its ROLLBACK, and clears no more
    for _ in range(5):
        with store._tx() as db:
            assert db.execute(look, ("j0",)).fetchone() == (0,)
    refused(lambda db: db.execute(look, ("j0",)).fetchone())  # the sixth: prepared, skipped
    for _ in range(2):
        with store._tx() as db:
            assert db.execute(look, ("j0",)).fetchone() == (0,)
        assert store.get_runner("r1") is not None
    store.close()


def test_a_refused_call_costs_its_batch_neither_its_connection_nor_the_others(
        database_url: str) -> None:
    """One connection in the pool: a batch with a call the database refuses runs its other
    calls again on that same connection (still the same backend: not closed and replaced,
    which with one connection left the batch waiting for the pool)."""
    store = PostgresStore(database_url, pool_size=1)
    enrolled(store)
    pid = store._fetch("SELECT pg_backend_pid()")[0][0]

    def refused() -> None:
        with store._tx() as db:
            db.execute(f"INSERT INTO runner_sessions ({', '.join(SessionRow._fields)}) "
                       "VALUES ('s1', 'r1', 'x', 1.0, 2.0)")  # refused at the commit

    t = time.monotonic()
    out = store.batched([lambda: store.record([ev("before")]), refused,
                         lambda: store.record([ev("after")])])
    assert time.monotonic() - t < 5.0
    assert out[0] == (True, None) and out[2] == (True, None), out
    assert not out[1][0] and "duplicate key" in str(out[1][1])
    assert store._fetch("SELECT pg_backend_pid()")[0][0] == pid
    store.close()
