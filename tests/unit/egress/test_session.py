"""The runner's egress session: decisions added up per destination, capped, rate-limited in
the audit trail, and cleaned before anything is kept (a real proxy on a real Unix socket; the
control plane and the sandbox are stand-ins that only record what they are given)."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.api.protocol import Assignment
from stockade.config import Settings
from stockade.control.egress import egress_summary
from stockade.runner import egress as session_module
from stockade.runner.egress import EgressSession
from stockade.runner.logs import JobLog
from stockade.spec import load_spec


class Control:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.batches = 0

    def report(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        self.batches += 1
        self.events += events


class Sandbox:
    def __init__(self, path: Path) -> None:
        self.egress_listener = socket.socket(socket.AF_UNIX)
        self.egress_listener.bind(str(path))
        self.egress_listener.listen(128)
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class Job:
    def __init__(self, root: Path, allow: str = "[api.example.test]", trust: str = "trusted",
                 clean: Any = None, **settings: Any) -> None:
        spec_path = root / "job.yaml"
        spec_path.write_text(f"name: t\negress: {{mode: block, allow: {allow}}}\n"
                             "steps: [{name: a, run: 'true'}]\n")
        spec = load_spec(spec_path)
        self.socket = root / "egress.sock"
        self.sandbox = Sandbox(self.socket)
        self.control = Control()
        self.log_path = root / "job.log"
        self.log = JobLog(self.log_path, 1 << 20, None)
        a = Assignment("job1", 1, "runner1", spec.to_json(), 0.0, trust=trust)
        extra = {"clean": clean} if clean else {}
        self.session = EgressSession(Settings(home=root, **settings), spec,
                                     self.sandbox, self.log,  # type: ignore[arg-type]
                                     self.control, a, **extra)

    def connect(self, target: str) -> bytes:
        method = "GET" if target.startswith("http://") else "CONNECT"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket))
            s.sendall(f"{method} {target} HTTP/1.1\r\n\r\n".encode())
            return s.recv(200)

    def close(self) -> tuple[Any, ...]:
        records = self.session.close()
        self.log.close()
        return records


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    jobs: list[Job] = []

    def build(**kw: Any) -> Job:
        root = tmp_path / f"j{len(jobs)}"
        root.mkdir()
        jobs.append(Job(root, **kw))
        return jobs[-1]

    yield build
    for job in jobs:
        job.session.proxy.stop()


def test_denials_are_added_up_capped_and_said_so(make: Any) -> None:
    job = make(egress_max_destinations=10)
    for i in range(300):
        assert job.connect(f"rep{i % 3}.x.test:443").startswith(b"HTTP/1.1 403")
    for i in range(400):
        job.connect(f"d{i}.x.test:443")
    for i in range(400):  # the same unrecorded destinations again: counted, not new
        job.connect(f"d{i}.x.test:443")
    records = job.close()
    kept = [r for r in records if not r.omitted]
    assert len(kept) == 10
    assert {r.destination: r.attempts for r in kept[:3]} == {
        "rep0.x.test:443": 100, "rep1.x.test:443": 100, "rep2.x.test:443": 100}
    assert all(r.attempts == 2 for r in kept[3:])
    [more] = [r for r in records if r.omitted]
    assert (more.omitted, more.attempts) == (393, 786)
    assert all(r.last_at >= r.at for r in records)

    summary = egress_summary(records)
    assert summary["truncated"] == 393 and len(summary["denied"]) == 10
    assert len(json.dumps(summary)) < 2048

    rows = job.control.events
    assert len(rows) <= 3 * 10 + 1
    counts: Counter[str] = Counter()
    for action, detail in rows:
        if action == "egress.denied":
            counts[f"{detail['host']}:{detail['port']}"] += detail["count"]
    assert counts["rep0.x.test:443"] == 100 and counts["d0.x.test:443"] == 2
    assert sum(counts.values()) == 300 + 2 * 7
    [truncated] = [d for a, d in rows if a == "egress.truncated"]
    assert (truncated["destinations"], truncated["attempts"], truncated["cap"]) == (393, 786, 10)

    log = job.log_path.read_text()
    assert log.count("egress denied: rep0.x.test:443") == 1
    assert log.count("egress denied:") == 10
    assert log.count("more than 10 destinations") == 1


def test_first_decisions_are_audited_at_once_repeats_at_most_every_interval(
        make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "REPORT_INTERVAL_S", 0.02)
    monkeypatch.setattr(session_module, "REPEAT_INTERVAL_S", 0.15)
    job = make(egress_max_destinations=2)
    deadline = time.monotonic() + 1.0
    n = 0
    while time.monotonic() < deadline:
        job.connect("evil.x.test:443")
        n += 1
    job.connect("other.x.test:443")
    job.close()
    rows = [d for a, d in job.control.events if a == "egress.denied"]
    evil = [d["count"] for d in rows if d["host"] == "evil.x.test"]
    assert sum(evil) == n
    # one first row, at most the budget (= the cap, 2) of repeat rows, one final row
    assert len(evil) <= 1 + 2 + 1
    assert len(rows) <= 3 * 2


def test_destinations_are_cleaned_before_anything_keeps_them(make: Any) -> None:
    secret = "Tok3nV4lue9"

    def clean(text: str) -> str:
        return text.replace(secret, "[MASKED]").replace("\x1b", "\\x1b")

    job = make(clean=clean)
    job.connect(f"{secret}.x.test:443")  # the proxy lower-cases names: cleaned before that
    job.connect(f"http://{secret}.x.test/")
    records = job.close()
    kept = json.dumps([r._asdict() for r in records]) + json.dumps(job.control.events)
    kept += json.dumps(egress_summary(records)) + job.log_path.read_text()
    assert secret.lower() not in kept.lower()
    assert egress_summary(records)["denied"] == ["[masked].x.test:443", "[masked].x.test:80"]


def test_operator_internal_destinations_apply_to_the_job(make: Any) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        job = make(allow="[]", egress_internal_allow=(f"127.0.0.1/32:{port}",))
        assert job.connect(f"127.0.0.1:{port}").startswith(b"HTTP/1.1 200")
        assert job.connect(f"127.0.0.1:{port + 1}").startswith(b"HTTP/1.1 403")
        job.close()
    finally:
        listener.close()


def test_an_untrusted_job_is_narrowed_to_the_operator_ceiling(make: Any) -> None:
    job = make(allow="[api.example.test, other.example.test]", trust="untrusted",
               egress_untrusted_allow=("*.example.test:443",), egress_hosts_file="/dev/null")
    job2 = make(allow="[api.example.test]", trust="untrusted")
    assert b"not in the allowlist" not in job.connect("api.example.test:443")
    assert b"not in the allowlist" in job2.connect("api.example.test:443")
    job.close()
    job2.close()
    assert "dropped: not allowed for untrusted jobs" in job2.log_path.read_text()
