"""The first run: killed while migrating, started eight times at once, or pointed at a file
that is not (or no longer) a stockade database. Real CLI, real SQLite."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from stockade.store.schema import metadata
from tests.conftest import STOCKADE, cli_env, run_cli

# Loaded by the real `stockade` through PYTHONPATH: SIGKILL the process the moment SQLite
# starts the first statement that begins with $KILL_AT_SQL (both sqlite3 entry points: the
# store's own connection and SQLAlchemy's).
KILLER = textwrap.dedent("""
    import os, signal, sqlite3

    _at = os.environ["KILL_AT_SQL"]
    _connect = sqlite3.connect

    def _trace(sql):
        if sql.lstrip().startswith(_at):
            os.kill(os.getpid(), signal.SIGKILL)

    def connect(*args, **kwargs):
        conn = _connect(*args, **kwargs)
        conn.set_trace_callback(_trace)
        return conn

    sqlite3.connect = sqlite3.dbapi2.connect = connect
""")


def assert_schema_is_current(db: Path) -> None:
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


def assert_usable(home: Path) -> None:
    """The next commands work, and the audit trail with its head verifies."""
    jobs = run_cli(home, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    verify = run_cli(home, "audit", "verify")
    assert verify.returncode == 0 and "audit trail intact: 0 events" in verify.stdout, \
        verify.stderr
    assert_schema_is_current(home / "stockade.db")


@pytest.mark.parametrize("statement", [
    "CREATE INDEX ix_jobs_status",  # in 0001, after its first table
    "ALTER TABLE jobs ADD COLUMN ref",  # in 0002, after a column of two
    "CREATE TABLE audit_head",  # in 0004, after 0001-0003
    "COMMIT",  # the end of the migrations
])
def test_a_first_run_killed_while_migrating_leaves_a_usable_home(
        tmp_path: Path, statement: str) -> None:
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(KILLER)
    home = tmp_path / "home"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "inject"),
                                               os.environ.get("PYTHONPATH")]))
    killed = subprocess.run([STOCKADE, "jobs"], capture_output=True, text=True, timeout=60,
                            env=cli_env(home, KILL_AT_SQL=statement, PYTHONPATH=pythonpath))
    assert killed.returncode == -9, killed.stderr  # it died at that statement
    assert_usable(home)


def half_migrated(db: Path, stamp: str, drop: list[str]) -> None:
    """What versions that committed each statement on its own left when killed: migrated to
    ``stamp``, then the stamp moved back and some of the objects that followed it missing."""
    cfg = Config()
    cfg.set_main_option("script_location", "stockade.store:migrations")
    cfg.set_main_option("sqlalchemy.url", f"sqlite:///{db}")
    command.upgrade(cfg, "0002")
    conn = sqlite3.connect(db)
    if stamp:
        conn.execute("UPDATE alembic_version SET version_num = ?", (stamp,))
    else:
        conn.execute("DROP TABLE alembic_version")
    for table in drop:
        conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("stamp", "drop"), [
    ("", ["audit_events", "secrets", "leases"]),  # "cannot migrate: table jobs already exists"
    ("0001", ["leases"]),  # "table secrets already exists" / "duplicate column name"
])
def test_a_home_that_older_versions_left_half_migrated_is_completed(
        tmp_path: Path, stamp: str, drop: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    half_migrated(home / "stockade.db", stamp, drop)
    assert_usable(home)


def test_eight_concurrent_first_runs_all_succeed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    procs = [subprocess.Popen([STOCKADE, "jobs"], env=cli_env(home), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(8)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    assert_usable(home)


def test_at_the_newest_schema_opening_takes_no_lock_and_no_sqlalchemy(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli(home, "jobs").returncode == 0
    (home / "stockade.db.lock").unlink(missing_ok=True)
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class Tell:
            def find_spec(self, name, path=None, target=None):
                if name == "sqlalchemy":
                    open(sys.argv[0] + ".imported-sqlalchemy", "w").close()

        sys.meta_path.insert(0, Tell())
    """))
    marker = Path(STOCKADE + ".imported-sqlalchemy")
    marker.unlink(missing_ok=True)
    done = run_cli(home, "jobs", PYTHONPATH=str(tmp_path / "inject"))
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert not (home / "stockade.db.lock").exists()


def foreign(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()


def newer(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
    conn.execute("INSERT INTO alembic_version VALUES ('9999')")
    conn.commit()


def not_sqlite(db: Path) -> None:
    db.write_bytes(b"\x8f\x01 this is no database " * 200)


def missing_table(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE jobs")
    conn.commit()


@pytest.mark.parametrize(("damage", "args", "says"), [
    (not_sqlite, ["audit", "verify"], "is not a SQLite database"),
    (foreign, ["jobs"], "is not a stockade database (it holds the tables 'users')"),
    (newer, ["audit", "verify"],
     "has schema revision '9999', which this version of stockade does not know"),
    (missing_table, ["jobs"], "is damaged (no such table: jobs)"),
])
def test_a_foreign_or_damaged_database_is_a_clear_error(
        tmp_path: Path, damage: Callable[[Path], None], args: list[str], says: str) -> None:
    home = tmp_path / "home"
    if damage is missing_table:
        assert run_cli(home, "jobs").returncode == 0
    else:
        home.mkdir(mode=0o700)
    damage(home / "stockade.db")
    proc = run_cli(home, *args)
    assert proc.returncode == 4, proc.stderr
    assert f"{home / 'stockade.db'}" in proc.stderr and says in proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 3


def test_a_corrupt_result_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli(home, "jobs").returncode == 0
    conn = sqlite3.connect(home / "stockade.db")
    conn.execute("INSERT INTO jobs (id, name, spec_json, status, created_at, result_json) "
                 "VALUES ('j1', 'n', '{}', 'failed', 1.0, 'not json {')")
    conn.commit()
    proc = run_cli(home, "show", "j1")
    assert proc.returncode == 4, proc.stderr
    assert f"the state database {home / 'stockade.db'} is damaged: the result of job j1 is " \
           "not a JSON object" in proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr
