"""The SQLite store: migrations match the schema, WAL, append-only audit, claims."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from stockade.audit import AuditEvent, verify_chain
from stockade.store.interface import JobRow
from stockade.store.migrate import head_revision
from stockade.store.schema import metadata
from stockade.store.sqlite import HEAD_REVISION, SqliteStore


def job(job_id: str, created: float, labels: str = "[]") -> JobRow:
    return JobRow(job_id, "n", "{}", labels, "queued", None, None, 0, None, None, created,
                  None, None, None)


def ev(action: str, job_id: str = "j1") -> AuditEvent:
    return AuditEvent("test", action, 1.0, job_id)


def test_head_constant_matches_alembic() -> None:
    assert head_revision() == HEAD_REVISION


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "s.db").close()
    engine = create_engine(f"sqlite:///{tmp_path / 's.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_wal_and_private_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


def test_audit_is_append_only_and_chained(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.insert_job(job("j1", 1.0), ev("job.admitted"))
    store.record([ev("job.note")])
    records = store.audit_records("j1")
    assert [r[0].action for r in records] == ["job.admitted", "job.note"]
    assert verify_chain(records) is None
    for sql in ("UPDATE audit_events SET action = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            store._db.execute(sql)


def test_claim_takes_the_oldest_eligible_job_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.insert_job(job("j2", 2.0), ev("job.admitted", "j2"))
    store.insert_job(job("j1", 1.0, '["gpu"]'), ev("job.admitted", "j1"))
    def no_gpu(j: JobRow) -> bool:
        return "gpu" not in j.labels_json
    claimed = store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed", j.id), no_gpu)
    assert claimed is not None and claimed.id == "j2" and claimed.attempt == 1
    again = store.claim_attempt("r2", lambda j: 100.0, lambda j: ev("job.claimed", j.id), no_gpu)
    assert again is None
    assert store.get_job("j2").status == "running"  # type: ignore[union-attr]


def test_finish_is_fenced_by_runner(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.insert_job(job("j1", 1.0), ev("job.admitted"))
    store.claim_attempt("r1", lambda j: 100.0, lambda j: ev("job.claimed"), lambda j: True)
    assert not store.finish_attempt("j1", 1, "r2", {"status": "succeeded"}, [], [], [ev("x")])
    assert store.finish_attempt("j1", 1, "r1", {"status": "succeeded"}, [], [], [ev("job.succeeded")])


def test_prefix_lookup(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.insert_job(job("jabc1", 1.0), ev("a", "jabc1"))
    store.insert_job(job("jabd2", 2.0), ev("a", "jabd2"))
    assert store.get_job("jabc").id == "jabc1"  # type: ignore[union-attr]
    assert store.get_job("jab") is None  # ambiguous
    assert store.get_job("j%") is None  # LIKE wildcards are literal


def test_secrets_from_before_ref_scopes_admit_any_ref(tmp_path: Path) -> None:
    """Migration 0003 adds ``scope_refs``; secrets stored before it keep admitting every ref."""
    from alembic import command
    from alembic.config import Config

    path = tmp_path / "s.db"
    cfg = Config()
    cfg.set_main_option("script_location", "stockade.store:migrations")
    cfg.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(cfg, "0002")
    db = sqlite3.connect(path)
    db.execute("INSERT INTO secrets VALUES ('OLD', 1, 'deploy-*', '[]', 'trusted', 'k1', "
               "x'00', x'00', 1.0, 1.0)")
    db.commit()
    db.close()
    row = SqliteStore(path).get_secret("OLD")
    assert row is not None and row.scope_refs == "*" and row.scope_jobs == "deploy-*"
