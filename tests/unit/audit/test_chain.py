"""The audit hash chain detects edits, deletions and reordering."""

from __future__ import annotations

from stockade.audit import GENESIS, AuditEvent, chain_hash, verify_chain


def chain(events: list[AuditEvent]) -> list[tuple[AuditEvent, str, str]]:
    out, prev = [], GENESIS
    for e in events:
        digest = chain_hash(prev, e)
        out.append((e, prev, digest))
        prev = digest
    return out


EVENTS = [AuditEvent("cli:root", f"job.step{i}", 1000.0 + i, "j1", {"i": i}) for i in range(4)]


def test_intact_chain_verifies() -> None:
    assert verify_chain(chain(EVENTS)) is None


def test_edit_is_detected() -> None:
    records = chain(EVENTS)
    e, prev, digest = records[2]
    records[2] = (AuditEvent(e.actor, "job.succeeded", e.at, e.job_id, e.detail), prev, digest)
    assert verify_chain(records) == 2


def test_deletion_is_detected() -> None:
    records = chain(EVENTS)
    del records[1]
    assert verify_chain(records) == 1
