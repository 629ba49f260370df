"""Plumbing for the fleet benchmarks (``dispatch.py``): real ``stockade server`` processes, the
state they share (SQLite file or a throwaway PostgreSQL cluster), lightweight runner clients
enrolled for real, a lean keep-alive HTTP/1.1 client so that the load generator costs the two
cores of these machines as little as possible, CPU accounting from /proc, and the raw claim
loops on each database that the fleet is compared with.

Every process started here is in :class:`Processes` and ended by :meth:`Processes.stop_all`
(the benchmark calls it in a ``finally``, also on Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]  # the repository
PYTHON = sys.executable
STOCKADE = str(Path(sys.executable).parent / "stockade")
TRIVIAL_SPEC = "name: t\nsteps:\n  - {name: t, run: 'true'}\n"

# Run in a subprocess with the configuration's environment, so that it opens the state (and
# migrates it) exactly as `stockade server` will: an admin API token, enrolment tokens, and
# a backlog of trivial jobs queued through the control plane (one transaction and audit event
# each, as a submission through the API makes them, minus HTTP and YAML parsing).
_SETUP = r"""
import json, sys, time
from stockade.api import auth
from stockade.audit import AuditEvent
from stockade.cli.context import fleet_service, open_control
from stockade.spec.parse import parse_spec
enrol, backlog, spec_text = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
settings, control = open_control()
fleet = fleet_service(settings, control)
now = time.time()
row, token = auth.new_token("bench-dispatch", "admin", "trusted", None, now, "*")
control.store.insert_token(row, AuditEvent("bench", "token.created", now, None,
                                           {"token": row.id, "role": row.role}))
tokens = [fleet.create_enrol_token("bench", 3600, "bench")[1] for _ in range(enrol)]
spec = parse_spec(spec_text, source="bench").to_job()
for _ in range(backlog):
    control.submit(spec, actor="bench", max_attempts=2)
print(json.dumps({"token": token, "enrol": tokens}))
"""


class Processes:
    """The processes the benchmark started (each in its own session), ended by id."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr to ``log``."""
        with log.open("ab") as out:
            p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        """Stop every process still running, newest first."""
        for p in reversed(list(self.procs)):
            self.stop(p, timeout=5.0)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Clean-up that a second Ctrl-C or SIGTERM does not cut short (in the main thread)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                    signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def base_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment for stockade processes: no STOCKADE_* of the caller's, a state
    directory ``home``, runners' code accepted whatever its digest (the checkout changes under
    concurrent work, and the digest is not what this benchmark measures; every other
    attestation check stays)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env.update({"STOCKADE_HOME": str(home), "STOCKADE_ATTEST_STOCKADE_DIGESTS": "*",
                "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra or {})
    return env


def setup_state(env: dict[str, str], enrol: int, backlog: int,
                spec: str = TRIVIAL_SPEC) -> dict[str, Any]:
    """Create (migrate) the state, an admin token, ``enrol`` enrolment tokens and a backlog of
    ``backlog`` queued jobs; returns ``{"token", "enrol": [...]}``."""
    done = subprocess.run([PYTHON, "-c", _SETUP, str(enrol), str(backlog), spec], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"setup failed: {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def queue_jobs(env: dict[str, str], n: int) -> None:
    """``n`` more queued jobs (no tokens), through the control plane."""
    setup_state(env, 0, n)


def start_server(procs: Processes, env: dict[str, str], log: Path,
                 argv: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A ``stockade server --listen 127.0.0.1:0`` (or ``argv``), once it listens: its URL."""
    argv = argv or [STOCKADE, "server", "--listen", "127.0.0.1:0"]
    seen = log.stat().st_size if log.exists() else 0  # a log of an earlier server goes on
    p = procs.start(argv, env, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(seen)
            text = f.read().decode(errors="replace")
        m = re.search(r"listening on (http://[0-9.]+:\d+)", text)
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"the server did not start: {log.read_text(errors='replace')[-2000:]}")


class Runner(NamedTuple):
    """An enrolled runner client: where it claims and its session token."""

    url: str
    runner_id: str
    token: str


_MEASURE = r"""
import json
from stockade.config import ensure_home, load_settings
from stockade.runner.attest import measure
from stockade.sandbox import get_backend
settings = load_settings()
ensure_home(settings)
print(json.dumps(measure(settings, get_backend("bwrap", settings))))
"""


def measurements(env: dict[str, str]) -> dict[str, Any]:
    """This host's real measurements (``runner/attest.measure``, as a runner agent takes
    them), taken once and shared by every lightweight runner client."""
    done = subprocess.run([PYTHON, "-c", _MEASURE], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"measuring failed: {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def enrol_one(url: str, enrol_token: str, name: str, m: dict[str, Any],
              source: str | None = None) -> Runner:
    """Enrol for real: an Ed25519 key, a server nonce, the measurements ``m`` signed; from
    the address ``source`` (a runner's host: the server serves few enrolments of one at
    once)."""
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from stockade.api.attestation import signed_bytes

    key = Ed25519PrivateKey.generate()
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(base_url=url, timeout=30, transport=transport) as client:
        nonce = client.post("/api/v1/enrol/nonce").raise_for_status().json()["nonce"]
        token_id = enrol_token.removeprefix("stke_").split("_")[0]
        signature = base64.b64encode(key.sign(signed_bytes(nonce, token_id, public, m))).decode()
        out = client.post("/api/v1/enrol", json={
            "token": enrol_token, "nonce": nonce, "public_key": public, "name": name,
            "labels": [], "concurrency": 1, "measurements": m, "signature": signature})
        if out.status_code != 200:
            raise RuntimeError(f"enrolment refused: {out.status_code} {out.text[:300]}")
        body = out.json()
    return Runner(url, body["runner_id"], body["token"])


def enrol_all(urls: list[str], enrol_tokens: list[str], m: dict[str, Any]) -> list[Runner]:
    """One runner per enrolment token, spread evenly over ``urls`` (it claims where it
    enrolled), each attesting with the measurements ``m``."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: enrol_one(urls[i % len(urls)], enrol_tokens[i],
                                                 f"bench-{i}", m, host_address(i)),
                             range(len(enrol_tokens))))


def host_address(i: int) -> str:
    """A loopback address of its own for simulated host ``i`` (the server bounds the
    connections of one client address; every runner here stands for a host)."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


class Http:
    """One keep-alive HTTP/1.1 connection (Content-Length bodies only: what uvicorn sends for
    these endpoints), reopened when the server closed it. About 30 us of client CPU a request,
    a tenth of httpx's, so that the load generator does not take the servers' CPU."""

    def __init__(self, url: str, source: str | None = None) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.source = host, int(port), source
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        local = (self.source, 0) if self.source else None
        self._r, self._w = await asyncio.open_connection(self.host, self.port,
                                                         local_addr=local)

    def close(self) -> None:
        """Close the connection (if open)."""
        if self._w is not None:
            self._w.close()
        self._r = self._w = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: str = "") -> tuple[int, bytes]:
        """``(status, body)``; one retry on a fresh connection if the kept one was closed."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: "
                f"{len(body)}\r\n{headers}\r\n").encode() + body
        for retry in (False, True):
            if self._w is None:
                await self._open()
            assert self._r is not None and self._w is not None
            self._w.write(head)
            try:
                line = await self._r.readline()
                if not line:
                    raise ConnectionResetError("closed")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if retry:
                    raise
                continue
            return await self._response(line)
        raise AssertionError("unreachable")

    async def _response(self, line: bytes) -> tuple[int, bytes]:
        assert self._r is not None
        status, length, close = int(line.split()[1]), 0, False
        while True:
            h = await self._r.readline()
            if h in (b"\r\n", b""):
                break
            name, _, value = h.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self._r.readexactly(length) if length else b""
        if close:
            self.close()
        return status, data


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` or of one of its threads (0 if gone)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu(parent: int) -> float:
    """CPU seconds of ``parent`` and its children, those alive and those it reaped (a
    PostgreSQL postmaster's backends come and go)."""
    try:
        fields = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == parent:
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def machine_busy() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine since boot (/proc/stat)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(parts[:8]) - idle) / hz, sum(parts[:8]) / hz


# -- the raw baseline: a claim loop straight on the database ------------------------------


def raw_loop(connect: Callable[[], Any], claim: Callable[[Any], bool], threads: int,
             warm: float, window: float) -> float:
    """Claims/s of ``threads`` threads each running ``claim(conn)`` on its own connection."""
    stop, times, lock = threading.Event(), [], threading.Lock()

    def worker() -> None:
        conn, mine = connect(), []
        while not stop.is_set() and claim(conn):
            mine.append(time.monotonic())
        conn.close()
        with lock:
            times.extend(mine)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    start = time.monotonic()
    for t in pool:
        t.start()
    time.sleep(warm + window)
    stop.set()
    for t in pool:
        t.join(30)
    return sum(1 for t in times if start + warm <= t < start + warm + window) / window


def raw_sqlite(path: Path, threads: int, warm: float, window: float) -> float:
    """BEGIN IMMEDIATE; SELECT the oldest queued; UPDATE it; COMMIT (WAL, synchronous=NORMAL,
    as stockade opens SQLite)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("PRAGMA journal_mode=WAL; CREATE TABLE q (id INTEGER PRIMARY KEY, "
                     "status TEXT, created_at REAL, runner TEXT); "
                     "CREATE INDEX q_queue ON q (status, created_at);")
    with db:
        db.execute("BEGIN")
        db.executemany("INSERT INTO q (status, created_at) VALUES ('queued', ?)",
                       ((float(i),) for i in range(int(20_000 * (warm + window)))))
    db.close()

    def connect() -> sqlite3.Connection:
        c = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        c.execute("PRAGMA synchronous = NORMAL")
        return c

    def claim(c: sqlite3.Connection) -> bool:
        c.execute("BEGIN IMMEDIATE")
        row = c.execute("SELECT id FROM q WHERE status = 'queued' ORDER BY created_at "
                        "LIMIT 1").fetchone()
        if row:
            c.execute("UPDATE q SET status = 'running', runner = ? WHERE id = ?",
                      (threading.get_ident(), row[0]))
        c.execute("COMMIT")
        return row is not None

    return raw_loop(connect, claim, threads, warm, window)


def raw_postgres(url: str, threads: int, warm: float, window: float) -> float:
    """SELECT the oldest queued FOR UPDATE SKIP LOCKED; UPDATE it; COMMIT (one transaction,
    persistent connections)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE q (id bigserial PRIMARY KEY, status text, created_at float8, "
                   "runner text)")
        db.execute("CREATE INDEX q_queue ON q (status, created_at)")
        db.execute("INSERT INTO q (status, created_at) SELECT 'queued', g FROM "
                   "generate_series(1, %s) g", (int(8_000 * (warm + window)),))
        db.execute("ANALYZE q")

    def claim(c: Any) -> bool:
        with c.transaction():
            row = c.execute("SELECT id FROM q WHERE status = 'queued' ORDER BY created_at "
                            "LIMIT 1 FOR UPDATE SKIP LOCKED").fetchone()
            if row:
                c.execute("UPDATE q SET status = 'running', runner = %s WHERE id = %s",
                          (str(threading.get_ident()), row[0]))
        return row is not None

    return raw_loop(lambda: psycopg.connect(url, autocommit=True), claim, threads, warm,
                    window)


# -- PostgreSQL: the test suite's throwaway cluster ---------------------------------------


class Postgres(NamedTuple):
    """A running throwaway cluster (tests/support/postgres.py) and its postmaster."""

    server: Any
    postmaster: int

    def new_database(self, name: str) -> str:
        """A new empty database's URL."""
        from tests.support.postgres import admin

        admin(self.server, f"CREATE DATABASE {name}")
        return str(self.server.url(name))


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """Start a loopback PostgreSQL cluster as the test suite does; stopped and removed after
    (also on Ctrl-C: the caller's ``finally``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support import postgres as pg

    try:
        server = pg.start_server()
    except BaseException as e:  # pytest.fail's Failed is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        raise RuntimeError(f"PostgreSQL did not start: {e}") from None
    try:
        pid = int((server.base / "data" / "postmaster.pid").read_text().split()[0])
        yield Postgres(server, pid)
    finally:
        with shielded():
            pg._stop(pg._bindir(), server.base)


def postgres_supported() -> bool:
    """Whether this checkout's stockade can keep its state in PostgreSQL yet."""
    from stockade.config import Settings

    return "database_url" in Settings._fields
