"""The SQL stores, each test on SQLite and on PostgreSQL unless it is about one of them:
migrations match the schema, append-only audit, claims, fencing, lookups; SQLite's WAL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from stockade.audit import AuditEvent, verify_chain
from stockade.store.interface import JobRow, Store
from stockade.store.migrate import head_revision
from stockade.store.open import open_store
from stockade.store.schema import metadata
from stockade.store.sql import HEAD_REVISION
from stockade.store.sqlite import SqliteStore
from tests.support.postgres import raw_execute, sqlalchemy_url


def job(job_id: str, created: float, labels: str = "[]") -> JobRow:
    return JobRow(job_id, "n", "{}", labels, "queued", None, None, 0, None, None, created,
                  None, None, None)


def ev(action: str, job_id: str = "j1") -> AuditEvent:
    return AuditEvent("test", action, 1.0, job_id)


def test_head_constant_matches_alembic() -> None:
    assert head_revision() == HEAD_REVISION


def test_migrated_schema_matches_the_models(store_url: str) -> None:
    open_store(store_url).close()
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_wal_and_private_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


def test_audit_is_append_only_and_chained(store_url: str) -> None:
    store = open_store(store_url)
    store.insert_job(job("j1", 1.0), ev("job.admitted"))
    store.record([ev("job.note")])
    records = store.audit_records("j1")
    assert [r[0].action for r in records] == ["job.admitted", "job.note"]
    assert verify_chain(records) is None
    changes = ["UPDATE audit_events SET action = 'x'", "DELETE FROM audit_events"]
    if not store_url.startswith("sqlite"):
        changes.append("TRUNCATE audit_events")
    for sql in changes:
        with pytest.raises(Exception, match="append-only") as caught:
            raw_execute(store_url, sql)
        assert not isinstance(caught.value, AssertionError)
    assert store.audit_records("j1") == records
    store.close()


def claim(store: Store, runner: str, eligible: object = None) -> JobRow | None:
    return store.claim_attempt(runner, lambda j: 100.0, lambda j: ev("job.claimed", j.id),
                               eligible or (lambda j: True))  # type: ignore[arg-type]


def test_tokens_are_read_by_id_many_at_once(store_url: str) -> None:
    from stockade.api.auth import new_token

    store = open_store(store_url)
    rows = [new_token(f"t{i}", "viewer", "trusted", None)[0] for i in range(3)]
    for row in rows:
        store.insert_token(row, ev("token.created", None))
    found = store.get_tokens([rows[0].id, rows[2].id, "tnosuch"])
    assert found == {rows[0].id: rows[0], rows[2].id: rows[2]}
    assert store.get_tokens([]) == {}
    store.close()


def test_claim_takes_the_oldest_eligible_job_once(store_url: str) -> None:
    store = open_store(store_url)
    store.insert_job(job("j2", 2.0), ev("job.admitted", "j2"))
    store.insert_job(job("j1", 1.0, '["gpu"]'), ev("job.admitted", "j1"))
    def no_gpu(j: JobRow) -> bool:
        return "gpu" not in j.labels_json
    claimed = claim(store, "r1", no_gpu)
    assert claimed is not None and claimed.id == "j2" and claimed.attempt == 1
    assert claim(store, "r2", no_gpu) is None
    assert store.get_job("j2").status == "running"  # type: ignore[union-attr]
    store.close()


def test_claim_looks_past_a_batch_of_jobs_it_cannot_run(store_url: str) -> None:
    store = open_store(store_url)
    for i in range(70):  # more than two batches the runner may not take
        store.insert_job(job(f"g{i:03}", float(i), '["gpu"]'), ev("job.admitted", f"g{i:03}"))
    store.insert_job(job("cpu", 100.0), ev("job.admitted", "cpu"))
    claimed = claim(store, "r1", lambda j: "gpu" not in j.labels_json)
    assert claimed is not None and claimed.id == "cpu"
    store.close()


def test_finish_is_fenced_by_runner(store_url: str) -> None:
    store = open_store(store_url)
    store.insert_job(job("j1", 1.0), ev("job.admitted"))
    claim(store, "r1")
    assert not store.finish_attempt("j1", 1, "r2", {"status": "succeeded"}, [], [], [ev("x")])
    assert store.finish_attempt("j1", 1, "r1", {"status": "succeeded"}, [], [],
                                [ev("job.succeeded")])
    assert [r[0].action for r in store.audit_records("j1")] == [
        "job.admitted", "job.claimed", "job.succeeded"]
    store.close()


def test_lost_jobs_fail_once_with_one_event(store_url: str) -> None:
    store = open_store(store_url)
    store.insert_job(job("j1", 1.0), ev("job.admitted"))
    claim(store, "r1")
    lost = store.fail_lost(200.0, [], lambda r: None, lambda j: ev("job.lost", j.id))
    assert lost == ["j1"] and store.get_job("j1").failure_reason == "runner_lost"  # type: ignore[union-attr]
    assert store.fail_lost(300.0, ["j1"], lambda r: True, lambda j: ev("job.lost", j.id)) == []
    assert [r[0].action for r in store.audit_records("j1")].count("job.lost") == 1
    store.close()


def test_prefix_lookup(store_url: str) -> None:
    store = open_store(store_url)
    store.insert_job(job("jabc1", 1.0), ev("a", "jabc1"))
    store.insert_job(job("jabd2", 2.0), ev("a", "jabd2"))
    assert store.get_job("jabc").id == "jabc1"  # type: ignore[union-attr]
    assert store.get_job("JABC").id == "jabc1"  # type: ignore[union-attr]
    assert store.get_job("jab") is None  # ambiguous
    assert store.get_job("j%") is None  # LIKE wildcards are literal
    assert store.get_job("jab_1") is None
    assert store.job_ids_with_prefix("jab", 5) == ["jabd2", "jabc1"]
    store.close()


def test_secrets_round_trip_and_replace(store_url: str) -> None:
    from stockade.store.interface import SecretRow

    store = open_store(store_url)
    row = SecretRow("S", 1, "*", "[]", "trusted", "*", "k1", b"\x00\x01", b"\xff" * 40, 1.0,
                    1.0)
    store.put_secret(row, ev("secret.set"))
    store.put_secret(row._replace(version=2, ciphertext=b"\x02"), ev("secret.set"))
    assert store.get_secret("S") == row._replace(version=2, ciphertext=b"\x02")
    assert store.delete_secret("S", ev("secret.removed"))
    assert not store.delete_secret("S", ev("secret.removed"))
    assert store.list_secrets() == []
    store.close()


def test_secrets_from_before_ref_scopes_admit_any_ref(store_url: str) -> None:
    """Migration 0003 adds ``scope_refs``; secrets stored before it keep admitting every ref."""
    cfg = Config()
    cfg.set_main_option("script_location", "stockade.store:migrations")
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(store_url).replace("%", "%%"))
    command.upgrade(cfg, "0002")
    engine = create_engine(sqlalchemy_url(store_url))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO secrets VALUES ('OLD', 1, 'deploy-*', '[]', 'trusted', "
                          "'k1', :b, :b, 1.0, 1.0)"), {"b": b"\x00"})
    engine.dispose()
    store = open_store(store_url)
    row = store.get_secret("OLD")
    assert row is not None and row.scope_refs == "*" and row.scope_jobs == "deploy-*"
    store.close()

