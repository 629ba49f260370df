"""Hostile specs that try to widen their own egress: internal ranges named by the spec
(directly or hidden in IPv6 translation prefixes), an operator's internal entry stretched to
other ports, and untrusted jobs asking for more than the operator allows untrusted work."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JobRun, run_cli
from tests.support.internet import Internet

HOSTS = "198.51.100.11 api.example.test\n198.51.100.12 files.example.test\n"
INTERNAL_FIX = "only the operator can open internal destinations: settings egress_internal_allow"


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Internet, Path]]:
    root = tmp_path_factory.mktemp("widening")
    os.chmod(root, 0o755)
    inet = Internet(root)
    hosts = root / "hosts"
    hosts.write_text(HOSTS)
    yield inet, hosts
    inet.close()


@pytest.mark.parametrize("entry", [
    "127.0.0.1/32:{port}", "127.0.0.0/8:{port}", "0.0.0.0/0:{port}", "169.254.169.254/32:80",
    "10.0.0.0/8:22", "192.168.0.0/16:443", "100.64.0.0/10:443", "[::1/128]:{port}",
    "[::/0]:{port}", "[fe80::/10]:443", "[fd00:ec2::254/128]:80",
    "[::ffff:127.0.0.1/128]:{port}",  # IPv4-mapped loopback
    "[2002:7f00:1::/48]:{port}",  # 6to4 of 127.0.0.1
    "[64:ff9b::a9fe:a9fe/128]:80",  # NAT64 of the metadata address
    "[2001::80ff:fffe/128]:{port}",  # Teredo client 127.0.0.1
])
def test_a_spec_naming_an_internal_range_never_runs(run_job: Any, host: Any, entry: str
                                                     ) -> None:
    entry = entry.format(port=host.listener.port)
    run = run_job(f"name: widen\negress: {{mode: block, allow: ['{entry}']}}\n"
                  "steps:\n  - {name: a, run: 'echo RAN'}\n")
    assert run.rc == 2, run.stderr
    assert INTERNAL_FIX in run.stderr and "RAN" not in run.stderr + run.stdout
    assert host.listener.hits == 0


def test_an_operator_entry_opens_exactly_its_port(hostile: Any, host: Any) -> None:
    port = host.listener.port
    targets = [f"127.0.0.1:{port}", f"[::ffff:127.0.0.1]:{port}", f"localhost:{port}",
               f"127.0.0.2:{port + 1}", f"[::1]:{port + 1}"]
    probes = "\n".join(
        f"printf 'CONNECT {t} HTTP/1.1\\r\\n\\r\\n' | socat -t 3 - TCP:127.0.0.1:3128 "
        f"| head -1 | sed 's/^/{t} -> /'" for t in targets)
    run = hostile(probes + "\necho DONE", extra="egress: {mode: audit}\n",
                  STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.1/32:{port + 1}")
    assert "DONE" in run.log
    for target in targets:
        assert f"{target} -> HTTP/1.1 403" in run.log, target
    assert run.result["egress"]["allowed"] == []


def untrusted(internet: tuple[Internet, Path], home: Path, tmp_path: Path, egress: str,
              script: str, **env: str) -> JobRun:
    hosts = internet[1]
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: fork-pr\negress: {egress}\nsteps:\n  - name: probe\n"
                    f"    run: |\n      {script}\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = run_cli(home, "run", str(spec), "--workspace", str(ws), "--json", "--trust",
                   "untrusted", STOCKADE_EGRESS_HOSTS_FILE=str(hosts), **env)
    result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return JobRun(proc.returncode, result, proc.stdout, proc.stderr, home)


def log_of(run: JobRun) -> str:
    """The stored log, if the job ran at all."""
    path = run.home / "logs" / f"{run.result.get('job_id')}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def refused(run: JobRun) -> bool:
    """Admission refused the job (exit 3, nothing ran)."""
    return run.rc == 3 and run.result.get("status", "denied") == "denied" and not log_of(run)


def test_an_untrusted_job_cannot_let_everything_out_with_audit_mode(
        internet: tuple[Internet, Path], stockade_home: Path, tmp_path: Path, host: Any) -> None:
    run = untrusted(internet, stockade_home, tmp_path, "{mode: audit}",
                    "curl -s --max-time 5 http://files.example.test/audit || true")
    text = run.stdout + run.stderr + log_of(run)
    assert "hello from" not in text
    assert refused(run) or run.result["egress"]["allowed"] == []  # refused, or narrowed
    if run.result.get("status") != "denied":
        host.assert_unaffected(run)


def test_an_untrusted_job_gets_no_more_than_the_untrusted_allowlist(
        internet: tuple[Internet, Path], stockade_home: Path, tmp_path: Path, host: Any) -> None:
    run = untrusted(internet, stockade_home, tmp_path,
                    "{mode: block, allow: ['api.example.test:80', 'files.example.test:80']}",
                    "curl -s --max-time 5 http://files.example.test/widened || true",
                    STOCKADE_EGRESS_UNTRUSTED_ALLOW="api.example.test:80")
    text = run.stdout + run.stderr + log_of(run)
    assert "path=/widened" not in text
    assert refused(run) or run.result["egress"]["denied"] == ["files.example.test:80"]
    if run.result.get("status") != "denied":
        host.assert_unaffected(run)


def test_an_untrusted_job_does_not_inherit_the_operators_internal_destinations(
        internet: tuple[Internet, Path], stockade_home: Path, tmp_path: Path, host: Any) -> None:
    """Internal destinations the operator opened for trusted builds stay closed to fork pull
    requests unless the untrusted allowlist covers them too."""
    port = host.listener.port
    probe = (f"printf 'CONNECT 127.0.0.1:{port} HTTP/1.1\\r\\n\\r\\n' | socat -t 3 - "
             "TCP:127.0.0.1:3128 | head -1 | sed 's/^/internal -> /'")
    run = untrusted(internet, stockade_home, tmp_path, "{mode: block}", probe,
                    STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.1/32:{port}")
    assert run.rc == 0, run.stderr[-2000:]
    assert "internal -> HTTP/1.1 403" in log_of(run)
    assert host.listener.hits == 0
    host.assert_unaffected(run)


def test_the_runner_hosts_own_addresses_are_refused(internet: tuple[Internet, Path],
                                                    hostile: Any) -> None:
    """198.51.100.1 is the host's end of the test internet: a service listening on all
    interfaces answers there, so it is as internal as loopback, even for a CIDR entry."""
    probes = "\n".join(
        f"printf 'CONNECT {t} HTTP/1.1\\r\\n\\r\\n' | socat -t 3 - TCP:127.0.0.1:3128 "
        f"| head -1 | sed 's/^/{t} -> /'" for t in ("198.51.100.1:80", "198.51.100.11:80"))
    run = hostile(probes + "\necho DONE",
                  extra="egress: {mode: block, allow: ['198.51.100.0/24:80']}\n")
    assert "198.51.100.1:80 -> HTTP/1.1 403" in run.log
    assert "runner host itself" in run.log
    assert "198.51.100.11:80 -> HTTP/1.1 200" in run.log  # the rest of the network is fine
