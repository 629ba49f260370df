"""Egress decisions as the control plane records and summarises them."""

from __future__ import annotations

from stockade.api.protocol import EgressRecord
from stockade.audit import AuditEvent
from stockade.egress.policy import is_ip


def egress_summary(records: tuple[EgressRecord, ...]) -> dict[str, list[str]]:
    """The ``egress`` object of a result: destinations allowed, denied, audit-only."""
    return {
        "allowed": sorted({r.destination for r in records if r.allowed}),
        "denied": sorted({r.destination for r in records if not r.allowed}),
        "audit_would_deny": sorted({r.destination for r in records if r.audit_only}),
    }


def allow_entry(host: str, port: int) -> str:
    """The allowlist entry admitting exactly ``host:port`` (a /32 or /128 for IP literals)."""
    if not is_ip(host):
        return f"{host}:{port}"
    return f"[{host}/128]:{port}" if ":" in host else f"{host}/32:{port}"


def egress_baseline(events: list[AuditEvent]) -> tuple[list[str], list[str]]:
    """Allowlist entries covering every destination these audit events let through, and the
    destinations refused outright (not allowlistable by name)."""
    allow: set[str] = set()
    refused: set[str] = set()
    for event in events:
        d = event.detail
        if event.action == "egress.allowed":
            allow.add(allow_entry(d["host"], d["port"]))
        elif event.action == "egress.denied" and "always refused" in d["reason"]:
            refused.add(f"{d['host']}:{d['port']} ({d['reason']})")
    return sorted(allow), sorted(refused)
