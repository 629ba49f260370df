"""A throwaway PostgreSQL server that the test session starts and stops itself.

``postgres_server`` (session): a new cluster (initdb) in a private directory under /tmp that
the ``postgres`` user owns (the checkout may be under a 0700 directory such as /root, which
that user cannot enter), listening on 127.0.0.1 only, on a free port, without a Unix socket;
a password is required over TCP. It is stopped and removed when the session ends, and a
cluster an earlier session left behind (killed) is removed at the next start.
``database_url``: a fresh database per test, dropped afterwards. ``store_url``: each store test
runs on the embedded SQLite file and on PostgreSQL.

No test is skipped: if PostgreSQL cannot start, the tests that need it fail and say why. If
it stops during the session, the next test that needs a database starts it again and warns
with the end of its log (which says what stopped it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

_PREFIX = "stockade-test-pg-"
_INSTALL = "install it with: apt-get install postgresql (make test does)"


class PostgresServer(NamedTuple):
    """A running test cluster: connect as ``user`` with ``password`` to 127.0.0.1:``port``."""

    port: int
    user: str
    password: str
    base: Path

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        """The URL of database ``dbname`` (with another ``password`` to test a wrong one)."""
        pw = self.password if password is None else password
        return f"postgresql://{self.user}:{pw}@127.0.0.1:{self.port}/{dbname}"


def _bindir() -> Path:
    """The newest installed server's programs (Debian keeps them per major version)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    if versions:
        return versions[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail(f"the PostgreSQL server is not installed (no initdb); {_INSTALL}",
                    pytrace=False)
    return Path(initdb).resolve().parent


def _as_owner(argv: list[str]) -> list[str]:
    """``argv`` as the ``postgres`` user when we are root (the server refuses to run as root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def _owner() -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(f"there is no postgres user to run the test server as; {_INSTALL}",
                    pytrace=False)
    return entry.pw_uid, entry.pw_gid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(_as_owner(argv), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd="/")
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
        pytest.fail(f"the test PostgreSQL server could not {what} ({' '.join(argv[:2])} "
                    f"exited {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                    f"{tail}", pytrace=False)


def _stop(bindir: Path, base: Path) -> None:
    """Stop the cluster in ``base`` (at once: its data is thrown away) and remove it."""
    data = base / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m",
                                  "immediate", "-w", "-t", "30"]),
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    shutil.rmtree(base, ignore_errors=True)


def _remove_stale(bindir: Path) -> None:
    """Clusters of earlier sessions that were killed before they could stop theirs."""
    for base in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            owner = int((base / "session.pid").read_text())
        except (OSError, ValueError):
            owner = 0
            with contextlib.suppress(OSError):
                if time.time() - base.stat().st_mtime < 600:
                    continue  # another session is creating it this moment
        if owner:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(owner, 0)
                continue  # its session still runs
        _stop(bindir, base)


def start_server() -> PostgresServer:
    """initdb a new cluster, start it on loopback, wait until it accepts connections."""
    bindir = _bindir()
    _remove_stale(bindir)
    uid, gid = _owner()
    base = Path(tempfile.mkdtemp(prefix=_PREFIX))
    try:
        (base / "session.pid").write_text(str(os.getpid()))
        password = secrets.token_hex(16)
        pwfile = base / "pw"
        pwfile.write_text(password + "\n")
        for path in (base, pwfile):
            os.chown(path, uid, gid)
        data, log = base / "data", base / "server.log"
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "stockade", f"--pwfile={pwfile}",
              "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-locale",
              "--no-sync"], "be created")
        port = _free_port()
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                       "unix_socket_directories = ''\nmax_connections = 300\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        _run([str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t",
              "60"], "start", log)
    except BaseException:
        _stop(bindir, base)
        raise
    return PostgresServer(port, "stockade", password, base)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started on first use, removed at the end)."""
    server = start_server()
    previous = signal.getsignal(signal.SIGTERM)

    def stop_then_die(signum: int, frame: object) -> None:  # CI's timeout, a kill of pytest
        _stop(_bindir(), server.base)
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop_then_die)
    try:
        yield server
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(_bindir(), server.base)


def admin(server: PostgresServer, sql: str) -> None:
    """Run ``sql`` on the server's maintenance database (autocommit)."""
    import psycopg

    with psycopg.connect(server.url(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


def _alive(server: PostgresServer) -> None:
    """Start the server again if something stopped it (a test's stray kill, say), with a
    warning that quotes the end of its log: the session goes on, and says what happened."""
    data, log = server.base / "data", server.base / "server.log"
    done = subprocess.run(_as_owner([str(_bindir() / "pg_ctl"), "status", "-D", str(data)]),
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    if done.returncode == 0:
        return
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
    import warnings

    warnings.warn(f"the test PostgreSQL server had stopped; started again. Its log ended:\n"
                  f"{tail}", stacklevel=2)
    _run([str(_bindir() / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t",
          "60"], "start again", log)


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    name = f"stk_{secrets.token_hex(6)}"
    _alive(postgres_server)
    admin(postgres_server, f"CREATE DATABASE {name}")
    try:
        yield postgres_server.url(name)
    finally:
        admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database of each backend: ``sqlite:///<tmp>/s.db``, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    return str(request.getfixturevalue("database_url"))


def sqlalchemy_url(store_url: str) -> str:
    """``store_url`` as SQLAlchemy (and so Alembic) takes it."""
    if store_url.startswith("postgresql://"):
        return "postgresql+psycopg://" + store_url.removeprefix("postgresql://")
    return store_url


def raw_execute(store_url: str, sql: str) -> None:
    """Run ``sql`` on the database directly, as someone going around stockade would (the
    database's own error propagates: sqlite3.Error or psycopg.Error)."""
    if store_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute(sql)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as pg:
        pg.execute(sql)
