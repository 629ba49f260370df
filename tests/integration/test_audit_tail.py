"""``stockade audit verify`` finds a removed tail: rows deleted, rows and the database's head
deleted or forged together, an older copy of the database put back, or the database deleted.
Real jobs, real CLI, real SQLite; the tampering is what someone with the file can do."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_cli

TRIGGERS = ("audit_events_no_delete", "audit_head_no_delete", "audit_head_only_forward")


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with two jobs (6 events), and ``older.db``: a copy after the first."""
    root = tmp_path_factory.mktemp("audit-tail")
    spec = root / "job.yaml"
    spec.write_text("name: audited\nsteps:\n  - {name: a, run: 'true'}\n")
    home = root / "home"
    for i in range(2):
        assert run_cli(home, "run", str(spec), "--workspace", str(root)).returncode == 0
        if i == 0:
            backup(home / "stockade.db", root / "older.db")
    return root


def backup(source: Path, target: Path) -> None:
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    src.backup(dst)
    src.close()
    dst.close()


def tamper(home: Path, *sql: str) -> None:
    """Run ``sql`` on the database as its owner could, triggers dropped first."""
    db = sqlite3.connect(home / "stockade.db")
    for trigger in TRIGGERS:
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()


DELETE_NEWEST = "DELETE FROM audit_events WHERE seq > 3"


def delete_newest(home: Path) -> None:
    tamper(home, DELETE_NEWEST)


def delete_newest_and_head(home: Path) -> None:
    tamper(home, DELETE_NEWEST, "DELETE FROM audit_head")


def delete_newest_and_forge_head(home: Path) -> None:
    tamper(home, DELETE_NEWEST, "UPDATE audit_head SET count = 3, "
                                "hash = (SELECT hash FROM audit_events WHERE seq = 3)")


def put_back_older_copy(home: Path) -> None:
    for name in ("stockade.db-wal", "stockade.db-shm"):
        (home / name).unlink(missing_ok=True)
    backup(home.parent / "older.db", home / "stockade.db")


def delete_database(home: Path) -> None:
    for name in ("stockade.db", "stockade.db-wal", "stockade.db-shm"):
        (home / name).unlink(missing_ok=True)


@pytest.mark.parametrize(("attack", "says"), [
    (delete_newest, "BROKEN: the database's head record expects 6 events, last hash {head}, "
                    "found 3 events, last hash {third}: the newest events were removed"),
    (delete_newest_and_head, "BROKEN: the database's head record is missing"),
    (delete_newest_and_forge_head, "BROKEN: {home}/audit.head expects at least 6 events, last "
                                   "hash {head}, found 3 events, last hash {third}: the newest "
                                   "events were removed, or the database was replaced by an "
                                   "older copy"),
    (put_back_older_copy, "BROKEN: {home}/audit.head expects at least 6 events, last hash "
                          "{head}, found 3 events"),
    (delete_database, "BROKEN: this database started afresh after an earlier trail that "
                      "ended at 6 events, last hash {head} ({home}/audit.head.before-"),
])
def test_verify_finds_a_removed_tail_even_after_new_events(
        trail: Path, tmp_path: Path, attack: Callable[[Path], None], says: str) -> None:
    home = tmp_path / "home"
    shutil.copytree(trail / "home", home)
    shutil.copy(trail / "older.db", tmp_path / "older.db")
    intact = run_cli(home, "audit", "verify")
    assert intact.returncode == 0 and "intact: 6 events" in intact.stdout, intact.stderr
    db = sqlite3.connect(home / "stockade.db")
    third, head = (h for (h,) in db.execute("SELECT hash FROM audit_events WHERE seq IN (3, 6) "
                                             "ORDER BY seq"))
    db.close()
    expected = says.format(home=home, head=head, third=third)

    attack(home)
    broken = run_cli(home, "audit", "verify")
    assert broken.returncode == 1 and expected in broken.stderr, broken.stderr
    assert "intact" not in broken.stdout and "Traceback" not in broken.stderr

    spec = tmp_path / "job.yaml"  # the installation goes on: the evidence stays
    spec.write_text("name: later\nsteps:\n  - {name: a, run: 'true'}\n")
    assert run_cli(home, "run", str(spec), "--workspace", str(tmp_path)).returncode == 0
    still = run_cli(home, "audit", "verify")
    assert still.returncode == 1 and "BROKEN" in still.stderr, still.stderr


def test_a_database_moved_away_on_purpose_can_be_acknowledged(trail: Path,
                                                              tmp_path: Path) -> None:
    """Moving the database away (the hint for a damaged one) starts a new trail: verify says
    so until the earlier head is taken away with it; a lost audit.head can be re-anchored from
    a database that verifies, never over an existing one."""
    home = tmp_path / "home"
    shutil.copytree(trail / "home", home)
    delete_database(home)
    spec = tmp_path / "job.yaml"
    spec.write_text("name: fresh\nsteps:\n  - {name: a, run: 'true'}\n")
    assert run_cli(home, "run", str(spec), "--workspace", str(tmp_path)).returncode == 0
    assert run_cli(home, "audit", "verify").returncode == 1
    for earlier in home.glob("audit.head.before-*"):
        earlier.rename(tmp_path / earlier.name)  # kept with the moved database
    assert run_cli(home, "audit", "verify").returncode == 0
    assert run_cli(home, "audit", "anchor").returncode == 2  # never overwrites a head
    (home / "audit.head").unlink()
    missing = run_cli(home, "audit", "verify")
    assert missing.returncode == 1 and "is missing" in missing.stderr
    assert "stockade audit anchor" in missing.stderr
    anchored = run_cli(home, "audit", "anchor")
    assert anchored.returncode == 0 and "audit head written: 3 events" in anchored.stdout
    assert run_cli(home, "audit", "verify").returncode == 0
