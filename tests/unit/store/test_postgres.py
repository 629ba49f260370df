"""The PostgreSQL store as replicas share it: concurrent claims, migrations and audit appends,
and errors a person can act on."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine

from stockade.audit import AuditEvent, verify_chain
from stockade.audit.head import head_of
from stockade.errors import StoreError, UsageError
from stockade.rlimits import raise_open_files
from stockade.store.interface import JobRow
from stockade.store.migrate import MIGRATION_LOCK
from stockade.store.open import open_store
from stockade.store.pgsets import first_page_sql
from stockade.store.postgres import PostgresStore, _options, _pg
from stockade.store.schema import metadata
from stockade.store.sql import HEAD_REVISION
from tests.support.postgres import PostgresServer, raw_execute, sqlalchemy_url


def job(job_id: str, created: float) -> JobRow:
    return JobRow(job_id, "n", "{}", "[]", "queued", None, None, 0, None, None, created,
                  None, None, None)


def ev(action: str, job_id: str | None = None, **detail: object) -> AuditEvent:
    return AuditEvent("test", action, time.time(), job_id, detail)


def in_threads(n: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` in ``n`` threads released at once; re-raise the first failure."""
    start, errors = threading.Barrier(n), []

    def run(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    if errors:
        raise errors[0]


def test_two_replicas_claim_every_job_exactly_once(database_url: str) -> None:
    replicas = [PostgresStore(database_url), PostgresStore(database_url)]
    for i in range(200):
        replicas[0].insert_job(job(f"j{i:04}", float(i)), ev("job.admitted", f"j{i:04}"))
    claimed: list[str] = []

    def claim_all(i: int) -> None:  # 8 threads, 4 on each replica
        store = replicas[i % 2]
        while (got := store.claim_attempt(f"r{i}", lambda j: 1e12,
                                          lambda j: ev("job.claimed", j.id),
                                          lambda j: True)) is not None:
            claimed.append(got.id)

    in_threads(8, claim_all)
    assert sorted(claimed) == [f"j{i:04}" for i in range(200)]
    assert all(n == 1 for n in Counter(claimed).values())
    assert {j.status for j in replicas[1].list_jobs(500)} == {"running"}
    assert all(len(replicas[1].attempts(f"j{i:04}")) == 1 for i in range(0, 200, 17))
    records = replicas[1].audit_records()
    assert len(records) == 400 and verify_chain(records) is None
    for store in replicas:
        store.close()


def test_a_claim_passes_over_jobs_another_replica_is_taking(database_url: str) -> None:
    store = PostgresStore(database_url)
    store.insert_job(job("j1", 1.0), ev("job.admitted", "j1"))
    store.insert_job(job("j2", 2.0), ev("job.admitted", "j2"))
    with psycopg.connect(database_url) as other:  # a replica in the middle of taking j1
        other.execute("SELECT id FROM jobs WHERE id = 'j1' FOR UPDATE")
        got: list[JobRow | None] = []
        t = threading.Thread(target=lambda: got.append(store.claim_attempt(
            "r1", lambda j: 1e12, lambda j: ev("job.claimed", j.id), lambda j: True)))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "the claim waited for the other replica's lock"
        other.rollback()
    assert got[0] is not None and got[0].id == "j2"
    store.close()


def test_concurrent_appends_from_two_replicas_keep_one_chain(database_url: str) -> None:
    replicas = [PostgresStore(database_url), PostgresStore(database_url)]

    def append(i: int) -> None:
        for n in range(25):
            replicas[i % 2].record([ev("note", thread=i, n=n, k=0), ev("note", thread=i, n=n,
                                                                       k=1)])

    in_threads(8, append)
    snap = replicas[0].audit_snapshot()
    assert len(snap.records) == 400 and verify_chain(snap.records) is None
    assert snap.db_head == head_of([digest for _, _, digest in snap.records])
    assert snap.file_head is None and snap.file_problem == ""  # no file on PostgreSQL
    for thread in range(8):  # each transaction's two events are adjacent in the chain
        mine = [r[0].detail for r in snap.records if r[0].detail["thread"] == thread]
        assert [(d["n"], d["k"]) for d in mine] == [(n, k) for n in range(25) for k in (0, 1)]
    for store in replicas:
        store.close()


MIGRATE = ("import sys; from stockade.store.postgres import PostgresStore, _pg; "
           "PostgresStore(sys.argv[1]).close()")


def test_replicas_starting_at_once_migrate_once(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as holder:
        # hold the migration lock, so that all three reach it before any migrates
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, database_url],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        deadline = time.monotonic() + 60
        while holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                             "NOT granted").fetchone() != (3,):
            assert time.monotonic() < deadline, "the replicas did not wait for the lock"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outcomes
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (HEAD_REVISION,)]
        assert conn.execute("SELECT count, hash FROM audit_head").fetchall() == [(0, "0" * 64)]
    engine = create_engine(sqlalchemy_url(database_url))
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


_INSERT_JOBS = ("INSERT INTO jobs (id, name, spec_json, labels_json, status, attempt, created_at) "
                "SELECT 'j' || g, 'n', repeat('x', 300), '[]', '{status}', 0, g FROM "
                "generate_series({first}, {last}) g")


@pytest.mark.parametrize("history", [
    # analyzed with every job queued (a burst), nearly all claimed since
    (_INSERT_JOBS.format(status="queued", first=1, last=12000), "ANALYZE jobs",
     "UPDATE jobs SET status = 'succeeded' WHERE created_at <= 11900"),
    # analyzed with none queued, then a burst
    (_INSERT_JOBS.format(status="succeeded", first=1, last=3000), "ANALYZE jobs",
     _INSERT_JOBS.format(status="queued", first=3001, last=9000)),
])
def test_a_claim_reads_the_head_of_the_queue_index_whatever_the_statistics_say(
        database_url: str, history: tuple[str, ...]) -> None:
    """The statistics are stale either way: a claim's first page reads the queue index from
    its head, not the jobs in order of creation past every one claimed (filtering on the
    status: a cost growing with each claim), nor every queued job
    through an index of the status alone, sorted (15-25 ms with 6,000)."""
    store = PostgresStore(database_url)
    for sql in history:
        raw_execute(database_url, sql)
    plan = "\n".join(r[0] for r in store._fetch(
        "EXPLAIN " + first_page_sql(20), (["r1"], 1.0, ["r1"], [], 0.0, ["r1"])))
    assert "ix_jobs_queue" in plan and "Sort" not in plan, plan
    store.close()


def test_counters_that_grow_without_bound_are_64_bit(database_url: str) -> None:
    PostgresStore(database_url).close()
    with psycopg.connect(database_url) as conn:
        types = dict(conn.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE column_name IN ('seq', 'count', 'size') AND table_name IN "
            "('audit_events', 'audit_head', 'artifacts')").fetchall())
    assert types == {"audit_events.seq": "bigint", "audit_head.count": "bigint",
                     "artifacts.size": "bigint"}


def test_placeholders_outside_literals_only(database_url: str) -> None:
    store = PostgresStore(database_url)
    assert store._read("SELECT '?', ?, '50%', 'it''s ?'", (1,)) == [("?", 1, "50%", "it's ?")]
    store.close()


@pytest.mark.parametrize(("values", "kind"), [
    ([], "text"), ([None], "int"), ([None, None], "text"), (["x", 'q"\\{,} \'', None], "text"),
    ([None, 1, 2**40], "int8"), ([1.5, None, 2.0], "float8"), ([], "float8")])
def test_array_parameters_travel_in_binary_and_come_back_whole(
        database_url: str, values: list[object], kind: str) -> None:
    # (an array written as text is quoted element by element, with regular expressions: a
    # batch's audit events cost 5 times the CPU)
    assert _pg(f"SELECT ?::{kind}[], ?, '?::text[]'") == f"SELECT %b::{kind}[], %s, '?::text[]'"
    store = PostgresStore(database_url)
    assert store._read(f"SELECT ?::{kind}[], cardinality(?::{kind}[])", (values, values)) == \
        [(values, len(values))]
    store.close()


def failure(url: str) -> StoreError:
    with pytest.raises(StoreError) as caught:
        PostgresStore(url).close()
    return caught.value


def test_an_unreachable_server_is_named_with_a_hint() -> None:
    e = failure("postgresql://stockade:sekrit@127.0.0.1:1/x")
    assert "cannot reach the PostgreSQL server of postgresql://stockade@127.0.0.1:1/x" in e.message
    assert "STOCKADE_DATABASE_URL" in e.hint and "sekrit" not in e.diagnostics()


def test_wrong_credentials_and_a_missing_database_say_so(postgres_server: PostgresServer
                                                         ) -> None:
    e = failure(postgres_server.url("postgres", password="wrong-password"))
    assert "refused the credentials of user stockade" in e.message
    assert "password" in e.hint and "wrong-password" not in e.diagnostics()
    e = failure(postgres_server.url("no_such_db"))
    assert e.message.endswith(f"127.0.0.1:{postgres_server.port}/no_such_db does not exist")
    assert "createdb" in e.hint


@pytest.mark.parametrize(("sqlstate", "says"), [
    ("40P01", "undid a change that conflicted with a concurrent one"),  # a deadlock
    ("40001", "undid a change that conflicted with a concurrent one"),  # serialization
    ("57014", "canceled a statement"),  # statement_timeout
])
def test_a_conflict_or_a_timeout_is_not_called_a_lost_connection(database_url: str,
                                                                  sqlstate: str,
                                                                  says: str) -> None:
    store = open_store(database_url)
    with pytest.raises(StoreError) as caught:
        store._fetch(  # type: ignore[attr-defined]
            f"DO $$ BEGIN RAISE EXCEPTION 'stand-in' USING ERRCODE = '{sqlstate}'; END $$")
    assert says in caught.value.message and "lost the connection" not in caught.value.message
    assert "repeat it" in caught.value.hint
    store.close()


@pytest.mark.parametrize("url", ["postgresql://u:p%zz@127.0.0.1/x", "postgresql://[::1/x",
                                 "postgresql://127.0.0.1/x?nonsense=1",
                                 "postgresql://127.0.0.1/x?connect_timeout=soon"])
def test_a_url_libpq_refuses_is_a_store_error_with_the_form(url: str) -> None:
    e = failure(url)
    assert "is not valid" in e.message and "postgresql://USER:PASSWORD@HOST" in e.hint
    assert "zz" not in e.message


def test_a_schema_newer_than_the_code_is_refused(database_url: str) -> None:
    PostgresStore(database_url).close()
    raw_execute(database_url, "UPDATE alembic_version SET version_num = '9999'")
    e = failure(database_url)
    assert "has schema revision '9999', which this version of stockade does not know" in e.message
    assert "newer stockade" in e.hint


def test_a_database_of_something_else_is_refused(database_url: str) -> None:
    raw_execute(database_url, "CREATE TABLE customers (id int)")
    e = failure(database_url)
    assert "is not a stockade database (it holds the tables 'customers')" in e.message
    raw_execute(database_url, "SELECT 1")


def test_the_factory_picks_the_backend_by_scheme(database_url: str) -> None:
    store = open_store(database_url.replace("postgresql://", "postgresql+psycopg://"))
    assert isinstance(store, PostgresStore)
    store.close()
    for url in ("mysql://u@h/db", "sqlite:///relative.db", "relative.db"):
        with pytest.raises(UsageError):
            open_store(url)


def test_a_pooled_connection_the_server_closed_is_replaced_when_lent(database_url: str
                                                                      ) -> None:
    """A connection the server closed (here pg_terminate_backend; a restart alike) is not
    lent again: the pool checks each before lending it; the call after it succeeds, on a new
    one."""
    store = PostgresStore(database_url, pool_size=1)
    pid = store._fetch("SELECT pg_backend_pid()")[0][0]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    assert store.get_runner("r1") is None
    assert store._fetch("SELECT pg_backend_pid()")[0][0] != pid
    store.close()


def test_after_a_restart_the_pool_lends_a_live_connection_at_once(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live idle connection is lent without a round trip of its own; a restart closes
    every idle connection of the pool, and the first one found dead has the others checked
    at once (the pool alone found them dead one at a time, waiting 1, 2, 4, 8, 16 s between
    them: its 30 s ran out with six)."""
    checked: list[object] = []
    check = ConnectionPool.check_connection

    def counted(conn: psycopg.Connection[object]) -> None:
        checked.append(conn)
        check(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counted))
    store = PostgresStore(database_url, pool_size=6)
    held = [store._pool.getconn() for _ in range(6)]
    pids = [conn.info.backend_pid for conn in held]
    for conn in held:
        store._pool.putconn(conn)
    assert store.get_runner("r1") is None
    assert checked == []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM unnest(%s::int[]) AS pid",
                     (pids,))
    started = time.monotonic()
    assert store.get_runner("r1") is None
    assert time.monotonic() - started < 10
    assert checked
    assert store._fetch("SELECT pg_backend_pid()")[0][0] not in pids
    store.close()


def test_connections_on_descriptors_past_1024_are_lent_and_checked(database_url: str) -> None:
    """A server holds a thousand client connections: the pool's connections then have
    descriptors past 1024, which select() refuses (every lend of one failed its check, for 30
    s each); they are lent, and checked after a restart, as any other."""
    if raise_open_files(1400) < 1400:
        pytest.skip("this process may not open 1400 files")
    fillers = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        store = PostgresStore(database_url, pool_size=2)
        assert store.get_runner("r1") is None
        pid = store._fetch("SELECT pg_backend_pid()")[0][0]
        assert all(conn.fileno() > 1024 for conn in store._pool._pool)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        started = time.monotonic()
        assert store.get_runner("r1") is None
        assert time.monotonic() - started < 10
        store.close()
    finally:
        for fd in fillers:
            os.close(fd)


def test_a_failover_without_goodbye_fails_only_the_calls_under_way(database_url: str) -> None:
    """The database's host rebooted or failed over: its connections are gone without a word
    (nothing to read on them; the first statement sent gets a reset). The call that finds
    its connection lost fails (it may have been committed: not repeated), and the pool's
    other idle connections are checked at once: the next calls succeed, not one failure per
    dead connection."""
    proxy = Cutter(database_url)
    url = database_url.replace(f":{proxy.target[1]}/", f":{proxy.port}/")
    store = PostgresStore(url, pool_size=6)
    held = [store._pool.getconn() for _ in range(6)]
    for conn in held:
        store._pool.putconn(conn)
    proxy.cut()
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(store.get_runner("r1") is None)
        except StoreError:
            outcomes.append(False)
    assert outcomes.count(False) <= 1 and outcomes[-1]
    store.close()
    proxy.close()


class Cutter:
    """A TCP relay on loopback to a PostgreSQL server; :meth:`cut` makes every connection
    relayed so far answer its next bytes with a reset (as after a failover: no FIN first)."""

    def __init__(self, database_url: str) -> None:
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        self.target = (str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.cut_before = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            n = len(self.pairs)
            self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, n), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, n: int | None) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if n is not None and n < self.cut_before:  # the client spoke to a dead host
                src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                src.close()
                dst.close()
                return
            if not data:
                dst.close()
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        self.cut_before = len(self.pairs)

    def close(self) -> None:
        self.listener.close()
        for a, b in self.pairs:
            a.close()
            b.close()


def test_the_pool_s_options_are_those_the_server_takes() -> None:
    """The URL's own options first; no incremental sorts only where PostgreSQL has them (13+:
    an older server refuses a connection that names the setting)."""
    assert _options("host=h", 150004) == \
        "-c enable_bitmapscan=off -c enable_incremental_sort=off"
    assert _options("host=h options='-c work_mem=8MB'", 120010) == \
        "-c work_mem=8MB -c enable_bitmapscan=off"


def test_pooled_connections_give_up_on_a_vanished_host_within_seconds(database_url: str
                                                                       ) -> None:
    """A database host that vanishes without a goodbye leaves a half-open connection; the
    store's connections carry TCP keepalives and a user timeout (seen on the socket itself),
    so neither an idle one nor one waiting on an unacknowledged statement waits for the
    kernel's ~15 minutes of retransmissions with the store's thread. The URL's own values
    win."""

    def options(url: str) -> tuple[int, int, int, int, int]:
        store = PostgresStore(url, pool_size=1)
        try:
            with store._lent() as conn:
                sock = socket.socket(fileno=os.dup(conn.fileno()))
                try:
                    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
                finally:
                    sock.close()
        finally:
            store.close()

    assert options(database_url) == (1, 20, 5, 4, 20000)
    sep = "&" if "?" in database_url else "?"
    assert options(f"{database_url}{sep}keepalives_idle=300&tcp_user_timeout=60000") == \
        (1, 300, 5, 4, 60000)


def test_blobs_are_stored_out_of_line_uncompressed(database_url: str) -> None:
    """Migration 0012: a download's slice (``substring``) fetches only its chunks; of a
    compressed value PostgreSQL decompresses all that comes before the slice, each time (a
    160 MiB blob: 17.5 s in slices). A blob stored compressed before is written again."""
    from alembic import command

    from stockade.store.migrate import _config

    store = PostgresStore(database_url)
    storage = ("SELECT attstorage FROM pg_attribute WHERE attrelid = 'blobs'::regclass AND "
               "attname = 'data'")
    assert store._fetch(storage) == [("e",)]
    store.close()
    cfg = _config(sqlalchemy_url(database_url))
    command.downgrade(cfg, "0011")
    old = b"compressible " * 100_000
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO blobs (sha256, size, data, created_at) VALUES "
                     "('c' || repeat('0', 63), %s, %s, 1.0)", (len(old), old))
        compressed = "SELECT pg_column_compression(data) FROM blobs"
        assert conn.execute(compressed).fetchall() == [("pglz",)]
    command.upgrade(cfg, "head")
    store = PostgresStore(database_url)
    assert store._fetch(storage) == [("e",)]
    assert store._fetch("SELECT pg_column_compression(data) FROM blobs") == [(None,)]
    assert store.read_blob("c" + "0" * 63, 13, 13) == b"compressible "
    store.close()
