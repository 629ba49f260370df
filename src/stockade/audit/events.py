"""Audit event values and the hash chain over them."""

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from stockade.hashing import sha256

GENESIS = "0" * 64


class AuditEvent(NamedTuple):
    """One audit record: ``actor`` did ``action`` at ``at`` (epoch seconds) to ``job_id``."""

    actor: str
    action: str
    at: float
    job_id: str | None = None
    detail: Mapping[str, Any] = {}

    def canonical(self) -> str:
        """The stable JSON form the hash covers."""
        return json.dumps(
            {"actor": self.actor, "action": self.action, "at": round(self.at, 6),
             "job_id": self.job_id, "detail": self.detail},
            sort_keys=True, separators=(",", ":"),
        )


def chain_hash(prev_hash: str, event: AuditEvent) -> str:
    """The hash of ``event`` chained after the record whose hash is ``prev_hash``."""
    return sha256(f"{prev_hash}\n{event.canonical()}".encode()).hexdigest()


def verify_chain(records: Iterable[tuple[AuditEvent, str, str]]) -> int | None:
    """Check ``(event, prev_hash, hash)`` records in order; the index of the first bad one."""
    expected_prev = GENESIS
    for i, (event, prev, digest) in enumerate(records):
        if prev != expected_prev or chain_hash(prev, event) != digest:
            return i
        expected_prev = digest
    return None
