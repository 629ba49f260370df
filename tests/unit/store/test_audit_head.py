"""The audit chain's head, in the database and in ``audit.head``: kept with every event, and
compared with the trail so that a removed tail is found. (On PostgreSQL the record in the
database is the only head; the tests that are not about the file run there too.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from stockade.audit import (
    GENESIS,
    AuditEvent,
    AuditHead,
    HeadFile,
    chain_hash,
    check_head,
    verify_chain,
)
from stockade.errors import StoreError
from stockade.store.interface import JobRow
from stockade.store.open import open_store
from stockade.store.sqlite import SqliteStore
from tests.support.postgres import raw_execute, sqlalchemy_url


def ev(i: int) -> AuditEvent:
    return AuditEvent("test", f"event.{i}", 1000.0 + i, "j1", {"i": i})


def heads(store: Any) -> tuple[AuditHead | None, AuditHead | None, str]:
    snap = store.audit_snapshot()
    return snap.db_head, snap.file_head, snap.file_problem


def hashes(store: Any) -> list[str]:
    return [digest for _, _, digest in store.audit_records()]


def problems(store: Any) -> list[str]:
    snap = store.audit_snapshot()
    return check_head([d for _, _, d in snap.records], snap.db_head, snap.file_head,
                      snap.file_problem, "audit.head")


def test_both_heads_move_with_every_committed_event(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    assert heads(store) == (AuditHead(0, GENESIS), AuditHead(0, GENESIS), "")
    store.record([ev(1), ev(2)])
    job = JobRow("j1", "n", "{}", "[]", "queued", None, None, 0, None, None, 1.0, None, None,
                 None)
    store.insert_job(job, ev(3))
    head = AuditHead(3, hashes(store)[-1])
    assert heads(store) == (head, head, "")
    with pytest.raises(StoreError):  # the same id again: the transaction and its event go
        store.insert_job(job, ev(4))
    assert heads(store) == (head, head, "")
    assert problems(store) == []


def test_a_trail_from_before_the_head_gets_its_head_when_migrated(store_url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", "stockade.store:migrations")
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(store_url).replace("%", "%%"))
    command.upgrade(cfg, "0003")
    engine = create_engine(sqlalchemy_url(store_url))
    prev = GENESIS
    with engine.begin() as conn:
        for i in (1, 2):
            digest = chain_hash(prev, ev(i))
            conn.execute(text("INSERT INTO audit_events (at, actor, action, job_id, detail_json, "
                              "prev_hash, hash) VALUES (:at, 'test', :action, 'j1', :detail, "
                              ":prev, :digest)"),
                         {"at": 1000.0 + i, "action": f"event.{i}", "detail": f'{{"i": {i}}}',
                          "prev": prev, "digest": digest})
            prev = digest
    engine.dispose()
    store = open_store(store_url)
    file_head = AuditHead(2, prev) if store_url.startswith("sqlite") else None
    assert heads(store) == (AuditHead(2, prev), file_head, "")
    store.record([ev(3)])
    assert verify_chain(store.audit_records()) is None
    assert heads(store)[0] == AuditHead(3, hashes(store)[-1])
    store.close()


def test_a_head_file_left_behind_verifies_and_catches_up(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.record([ev(1), ev(2), ev(3)])
    # its writer was killed between the commit and the file, twice
    store.audit_head.path.unlink()
    store.audit_head.create(AuditHead(1, hashes(store)[0]))
    assert problems(store) == []
    store.record([ev(4)])
    assert heads(store)[1] == AuditHead(4, hashes(store)[-1])


def test_a_head_file_on_another_or_a_longer_trail_is_never_overwritten(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.record([ev(1), ev(2)])
    other = AuditHead(4, "ab" * 32)  # e.g. the database was replaced by another one
    store.audit_head.path.unlink()
    store.audit_head.create(other)
    store.record([ev(3), ev(4), ev(5)])  # the trail grows past the file's count
    store.record([ev(6)])
    assert heads(store)[1] == other
    assert problems(store) == [f"audit.head expects event 4 to have hash {'ab' * 32}, found "
                               f"{hashes(store)[3]}: the database was replaced or rewritten"]


def test_a_deleted_head_record_restarts_visibly(store_url: str) -> None:
    store = open_store(store_url)
    store.record([ev(1), ev(2)])
    moves = ("DELETE FROM audit_head", "UPDATE audit_head SET count = 5")
    if store_url.startswith("postgresql"):  # moved once per statement, by its trigger only
        moves += ("UPDATE audit_head SET count = count + 1",)
    for sql in moves:
        with pytest.raises(Exception, match="audit_head moves only with audit_events"):
            raw_execute(store_url, sql)
    if store_url.startswith("sqlite"):
        raw_execute(store_url, "DROP TRIGGER audit_head_no_delete")
    else:  # the owner of the table can, as it can drop SQLite's trigger
        raw_execute(store_url, "ALTER TABLE audit_head DISABLE TRIGGER audit_head_no_delete")
    raw_execute(store_url, "DELETE FROM audit_head")
    assert heads(store)[0] is None
    store.record([ev(3)])
    assert verify_chain(store.audit_records()) == 2  # event 3 chains onto the start again
    assert problems(store)[0].startswith("the database's head record expects 1 events")
    store.close()


def test_check_head_says_what_it_found_and_what_it_expected() -> None:
    trail = ["a" * 64, "b" * 64, "c" * 64]
    found = f"found 3 events, last hash {'c' * 64}"
    ok = AuditHead(3, "c" * 64)
    assert check_head(trail, ok, ok, "", "F") == []
    assert check_head(trail, ok, AuditHead(2, "b" * 64), "", "F") == []  # the file lags
    assert check_head(trail, AuditHead(5, "e" * 64), ok, "", "F") == [
        f"the database's head record expects 5 events, last hash {'e' * 64}, {found}: the "
        "newest events were removed"]
    assert check_head(trail, None, ok, "", "F") == [
        f"the database's head record is missing ({found})"]
    assert check_head(trail, ok, None, "", "F") == [
        f"F (the copy of the head outside the database) is missing ({found})"]
    assert check_head(trail, ok, None, "F is not an audit head file", "F") == [
        "F is not an audit head file"]
    assert check_head(trail, ok, AuditHead(5, "e" * 64), "", "F") == [
        f"F expects at least 5 events, last hash {'e' * 64}, {found}: the newest events were "
        "removed, or the database was replaced by an older copy"]
    assert check_head(trail, ok, AuditHead(2, "e" * 64), "", "F") == [
        f"F expects event 2 to have hash {'e' * 64}, found {'b' * 64}: the database was "
        "replaced or rewritten"]


@pytest.mark.parametrize("content", [
    b"garbage", b"[1]", b'{"count": 1}', b'{"count": -1, "hash": "' + b"a" * 64 + b'"}',
    b'{"count": 1, "hash": "xyz"}', b'{"count": true, "hash": "' + b"a" * 64 + b'"}',
    b"[" * 4000, b" " * 5000, b'{"count": 1' + b"0" * 5000 + b', "hash": "x"}',
])
def test_a_head_file_stockade_did_not_write_is_refused_and_kept(tmp_path: Path,
                                                                content: bytes) -> None:
    path = tmp_path / "audit.head"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not an audit head file"):
        HeadFile(path).read()
    HeadFile(path).advance(AuditHead(0, GENESIS), AuditHead(1, "a" * 64), lambda h: True)
    assert path.read_bytes() == content


def test_a_head_file_is_created_once_and_moves_in_place(tmp_path: Path) -> None:
    path = tmp_path / "audit.head"
    file = HeadFile(path)
    assert file.read() is None
    file.advance(AuditHead(0, GENESIS), AuditHead(1, "a" * 64), lambda h: True)
    assert file.read() is None  # a missing file is evidence too: not created by an event
    file.create(AuditHead(0, GENESIS))
    file.create(AuditHead(9, "f" * 64))  # never reset
    assert file.read() == AuditHead(0, GENESIS) and path.stat().st_mode & 0o777 == 0o600
    inode = path.stat().st_ino
    file.advance(AuditHead(0, GENESIS), AuditHead(123456, "f" * 64), lambda h: True)
    assert file.read() == AuditHead(123456, "f" * 64)
    assert path.stat().st_size == 128 and path.stat().st_ino == inode
