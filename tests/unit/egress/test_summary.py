"""What the control plane makes of egress records and events: bounded summaries, baselines
that never suggest an entry a spec may not hold."""

from __future__ import annotations

import json

from stockade.api.protocol import EgressRecord
from stockade.audit import AuditEvent
from stockade.control.egress import egress_baseline, egress_summary


def record(host: str, allowed: bool = False, omitted: int = 0) -> EgressRecord:
    return EgressRecord(host=host, port=443, address=None, allowed=allowed, reason="r",
                        audit_only=False, bytes_up=0, bytes_down=0, duration_s=0.0, at=1.0,
                        omitted=omitted)


def test_the_summary_is_bounded_whatever_a_runner_sends() -> None:
    records = tuple(record(f"{i}{'x' * 400}.test") for i in range(5000))
    summary = egress_summary((*records, record("", omitted=7)), limit=100)
    assert len(summary["denied"]) == 100 and summary["truncated"] == 4900 + 7
    assert all(len(d) <= 300 for d in summary["denied"])
    assert len(json.dumps(summary)) < 64 * 1024


def test_no_truncated_key_when_nothing_was_left_out() -> None:
    assert egress_summary((record("a.test", allowed=True), record("b.test"))) == {
        "allowed": ["a.test:443"], "denied": ["b.test:443"], "audit_would_deny": []}


def event(host: str, port: int) -> AuditEvent:
    return AuditEvent("runner", "egress.allowed", 1.0, "job", {
        "host": host, "port": port, "reason": "allowlisted"})


def test_the_baseline_leaves_out_what_only_the_operator_opens() -> None:
    allow, left_out = egress_baseline([event("api.example.test", 443),
                                       event("127.0.0.7", 8080), event("***.x.test", 443)])
    assert allow == ["api.example.test:443"]
    assert any(line.startswith("127.0.0.7:8080 (") and "egress_internal_allow" in line
               for line in left_out)
    assert any(line.startswith("***.x.test:443 (") for line in left_out)
