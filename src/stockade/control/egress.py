"""Egress decisions as the control plane records and summarises them."""

from __future__ import annotations

from typing import Any

from stockade.api.protocol import EgressRecord
from stockade.audit import AuditEvent

# a runner keeps at most egress_max_destinations; this bounds what any runner may send
MAX_LISTED = 1024
MAX_DESTINATION = 300  # characters of one destination (a name is at most 253)


def egress_summary(records: tuple[EgressRecord, ...], limit: int = MAX_LISTED
                   ) -> dict[str, Any]:
    """The ``egress`` object of a result: destinations allowed, denied, audit-only, each list
    at most ``limit`` long; ``truncated`` (only when some were left out) says how many more
    destinations there were."""
    omitted = sum(r.omitted for r in records)
    lists: dict[str, set[str]] = {"allowed": set(), "denied": set(), "audit_would_deny": set()}
    for r in records:
        if r.omitted:
            continue
        shown = r.destination[:MAX_DESTINATION]
        for name, hit in (("allowed", r.allowed), ("denied", not r.allowed),
                          ("audit_would_deny", r.audit_only)):
            if hit and (shown in lists[name] or len(lists[name]) < limit):
                lists[name].add(shown)
            elif hit:
                omitted += 1
    summary: dict[str, Any] = {name: sorted(found) for name, found in lists.items()}
    if omitted:
        summary["truncated"] = omitted
    return summary


def allow_entry(host: str, port: int) -> str:
    """The allowlist entry admitting exactly ``host:port`` (a /32 or /128 for IP literals)."""
    from stockade.egress.policy import is_ip  # the baseline only: not on a job's path

    if not is_ip(host):
        return f"{host}:{port}"
    return f"[{host}/128]:{port}" if ":" in host else f"{host}/32:{port}"


def egress_baseline(events: list[AuditEvent]) -> tuple[list[str], list[str]]:
    """Allowlist entries covering every destination these audit events let through, and the
    destinations left out: refused outright, or ones no spec may name (an internal destination
    only the operator opens, a name masked when it was recorded)."""
    from stockade.egress.policy import parse_rule

    allow: set[str] = set()
    refused: set[str] = set()
    for event in events:
        d = event.detail
        if event.action == "egress.allowed":
            entry = allow_entry(d["host"], d["port"])
            try:  # e.g. an internal destination the operator opened: no spec may name it
                parse_rule(entry)
                allow.add(entry)
            except ValueError as e:
                refused.add(f"{d['host']}:{d['port']} ({str(e)[:300]})")
        elif event.action == "egress.denied" and d.get("address"):  # only the operator may
            need = (f"; the entry it needs: egress_internal_allow = "
                    f"[\"{allow_entry(str(d['address']), d['port'])}\"]")
            refused.add(f"{d['host']}:{d['port']} ({d['reason']}{need})")
    return sorted(allow), sorted(refused)
