"""Egress policy end to end: real jobs, the real proxy, a test "internet" in a network namespace.

Names resolve through the runner's hosts override (``STOCKADE_EGRESS_HOSTS_FILE``), which a
job spec cannot set. Public-looking destinations live in the test namespace (198.51.100.0/24,
2001:db8:51::/64); the "internal" destinations are loopback listeners on this host, which
must never see a connection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STOCKADE, JobRun, cli_env, job_dir, run_cli
from tests.containment.conftest import Listener
from tests.support.internet import Internet
from tests.support.web import InternalService

HOSTS = """\
198.51.100.11 api.example.test
198.51.100.12 files.example.test
198.51.100.13 a.b.example.test
198.51.100.10 example.test evil.example.test
2001:db8:51::10 v6.example.test
127.0.0.5 internal.example.test
198.51.100.11 rebind.example.test
127.0.0.5 rebind.example.test
"""


class Net:
    """The test internet plus what a job needs to use it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.internet = Internet(root)
        self.hosts = root / "hosts"
        self.hosts.write_text(HOSTS)
        self.listener = Listener("127.0.0.5")

    def close(self) -> None:
        self.listener.close()
        self.internet.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("egress")
    os.chmod(root, 0o755)
    n = Net(root)
    yield n
    n.close()


def spec_text(egress: str, script: str, *more_steps: str) -> str:
    body = "\n".join("      " + line for line in textwrap.dedent(script).strip().splitlines())
    steps = f"  - name: probe\n    run: |\n{body}\n"
    for i, extra in enumerate(more_steps):
        steps += f"  - {{name: after{i}, run: '{extra}'}}\n"
    return f"name: egress\negress: {egress}\nsteps:\n{steps}"


def job_files(net: Net, tmp_path: Path, spec: str) -> tuple[Path, Path]:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    shutil.copy(net.internet.cert, ws / "ca.crt")
    path = tmp_path / "job.yaml"
    path.write_text(spec)
    return path, ws


def run(net: Net, home: Path, tmp_path: Path, egress: str, script: str, *more: str,
        **env: str) -> JobRun:
    path, ws = job_files(net, tmp_path, spec_text(egress, script, *more))
    proc = run_cli(home, "run", str(path), "--workspace", str(ws), "--json",
                   STOCKADE_EGRESS_HOSTS_FILE=str(net.hosts), **env)
    result = json.loads(proc.stdout) if proc.stdout else {}
    return JobRun(proc.returncode, result, proc.stdout, proc.stderr, home)


def start(net: Net, home: Path, tmp_path: Path, egress: str, script: str, **env: str
          ) -> subprocess.Popen[str]:
    path, ws = job_files(net, tmp_path, spec_text(egress, script))
    return subprocess.Popen([STOCKADE, "run", str(path), "--workspace", str(ws), "--json"],
                            env=cli_env(home, STOCKADE_EGRESS_HOSTS_FILE=str(net.hosts), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], home: Path) -> JobRun:
    out, err = proc.communicate(timeout=120)
    return JobRun(proc.returncode, json.loads(out), out, err, home)


CURL = "curl -sS --max-time 10 --cacert ca.crt"


def audit_rows(home: Path, job_id: str, action: str) -> list[dict[str, Any]]:
    """The details of this job's audit events of ``action``."""
    out = run_cli(home, "audit", "list", "--job", job_id, "--json").stdout
    return [e["detail"] for e in json.loads(out) if e["action"] == action]


def test_allowed_host_works_with_curl_and_urllib(net: Net, stockade_home: Path,
                                                 tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path,
              "{mode: block, allow: [api.example.test, 'api.example.test:80']}", f"""
        {CURL} https://api.example.test/tls
        {CURL} http://api.example.test/plain
        python3 - <<'PY'
        import ssl, urllib.request
        ctx = ssl.create_default_context(cafile="ca.crt")
        tls = urllib.request.urlopen("https://api.example.test/urllib-tls", context=ctx)
        print(tls.read().decode())
        print(urllib.request.urlopen("http://api.example.test/urllib-plain").read().decode())
        PY
    """)
    assert job.rc == 0, job.stderr
    for path in ("/tls", "/plain", "/urllib-tls", "/urllib-plain"):
        assert "hello from 198.51.100.11" in job.log and f"path={path} " in job.log
    assert job.result["egress"]["allowed"] == ["api.example.test:443", "api.example.test:80"]
    assert job.result["egress"]["denied"] == []


def test_wildcard_rules(net: Net, stockade_home: Path, tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: ['*.example.test:443']}", f"""
        {CURL} https://a.b.example.test/deep
        {CURL} https://api.example.test/one
        {CURL} https://example.test/apex || echo APEX-DENIED
        {CURL} http://api.example.test/port80 || echo PORT-DENIED
    """)
    assert job.rc == 0, job.stderr
    assert "path=/deep" in job.log and "path=/one" in job.log
    assert "APEX-DENIED" in job.log and "PORT-DENIED" not in job.log  # 403 body, exit 0
    assert job.result["egress"]["denied"] == ["api.example.test:80", "example.test:443"]


def test_denied_host_is_refused_recorded_and_logged_once(net: Net, stockade_home: Path,
                                                         tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: [api.example.test]}", """
        for i in 1 2 3; do
          curl -s -o /dev/null --max-time 5 -p http://evil.example.test/ || true
        done
    """)
    assert job.rc == 0
    assert job.log.count("egress denied: evil.example.test:80") == 1
    assert job.result["egress"]["denied"] == ["evil.example.test:80"]
    rows = audit_rows(stockade_home, job.result["job_id"], "egress.denied")
    assert 1 <= len(rows) <= 2  # the first at once, the repeats added up
    assert sum(row["count"] for row in rows) == 3


def test_no_direct_network_even_with_egress(net: Net, stockade_home: Path,
                                           tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: ['198.51.100.0/24:80']}", """
        python3 - <<'PY'
        import socket
        for family, addr in ((socket.AF_INET, ("198.51.100.11", 80)),
                             (socket.AF_INET6, ("2001:db8:51::10", 80))):
            try:
                socket.create_connection(addr, timeout=3)
                print("DIRECT-TCP-CONNECTED", addr)
            except OSError as e:
                print("direct tcp refused:", e)
            try:
                s = socket.socket(family, socket.SOCK_DGRAM)
                s.sendto(b"x", addr)
                print("DIRECT-UDP-SENT", addr)
            except OSError as e:
                print("direct udp refused:", e)
        try:
            socket.getaddrinfo("api.example.test", 443)
            print("DNS-WORKED")
        except OSError as e:
            print("no dns:", e)
        PY
        curl -sS --noproxy '*' --max-time 3 http://198.51.100.11/ || echo NOPROXY-FAILED
    """)
    for leak in ("DIRECT-TCP-CONNECTED", "DIRECT-UDP-SENT", "DNS-WORKED"):
        assert leak not in job.log
    assert "NOPROXY-FAILED" in job.log


def test_ip_literal_needs_a_cidr_rule(net: Net, stockade_home: Path, tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: ['api.example.test:80']}", """
        curl -sS --max-time 5 http://198.51.100.11/literal
        curl -sS --max-time 5 -g 'http://[2001:db8:51::10]/literal6'
    """)
    assert "path=/literal" not in job.log
    assert "IP literal 198.51.100.11:80 is not in an allowlisted network" in job.log
    assert job.result["egress"]["denied"] == ["198.51.100.11:80", "[2001:db8:51::10]:80"]


def test_names_resolving_to_internal_addresses_are_refused(net: Net, stockade_home: Path,
                                                          tmp_path: Path) -> None:
    port = net.listener.port
    job = run(net, stockade_home, tmp_path,
              f"{{mode: block, allow: ['internal.example.test:{port}', "
              f"'rebind.example.test:80']}}", f"""
        curl -sS --max-time 5 http://internal.example.test:{port}/ || true
        curl -sS --max-time 5 http://rebind.example.test/mixed
    """)
    assert "internal.example.test resolves to 127.0.0.5: loopback address 127.0.0.5 is refused" \
        in job.log
    assert "hello from 198.51.100.11:80 path=/mixed" in job.log  # only the public address used
    assert net.listener.hits == 0
    audit = run_cli(stockade_home, "show", job.result["job_id"]).stdout
    assert "egress.denied" in audit and "egress.allowed" in audit


def test_cidr_rule_admits_exactly_its_range(net: Net, stockade_home: Path,
                                           tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path,
              "{mode: block, allow: ['198.51.100.10/31:80', '[2001:db8:51::/64]:80']}", """
        for ip in 198.51.100.10 198.51.100.11 198.51.100.12; do
          curl -sS --max-time 5 http://$ip/cidr || true; echo; done
        curl -sS --max-time 5 http://198.51.100.10:8080/otherport || true; echo
        curl -sS --max-time 5 -g 'http://[2001:db8:51::10]/v6'
    """)
    assert "hello from 198.51.100.10:80 path=/cidr" in job.log
    assert "hello from 198.51.100.11:80 path=/cidr" in job.log
    assert "198.51.100.12:80 path=/cidr" not in job.log
    assert "path=/otherport" not in job.log
    assert "hello from 2001:db8:51::10:80 path=/v6" in job.log
    assert job.result["egress"]["denied"] == ["198.51.100.10:8080", "198.51.100.12:80"]


def test_audit_mode_allows_records_and_baselines(net: Net, stockade_home: Path,
                                                tmp_path: Path) -> None:
    port = net.listener.port
    job = run(net, stockade_home, tmp_path, "{mode: audit, allow: ['api.example.test:443']}",
              f"""
        {CURL} https://api.example.test/known
        {CURL} https://files.example.test/unknown
        {CURL} -g 'http://v6.example.test/six'
        curl -sS --max-time 5 http://internal.example.test:{port}/ || true
    """)
    assert job.rc == 0
    assert "path=/unknown" in job.log and "path=/six" in job.log
    assert net.listener.hits == 0
    egress = job.result["egress"]
    assert egress["audit_would_deny"] == ["files.example.test:443", "v6.example.test:80"]
    assert egress["denied"] == [f"internal.example.test:{port}"]
    assert "egress would be denied (audit): files.example.test:443" in job.log
    base = run_cli(stockade_home, "egress", "baseline", job.result["job_id"])
    assert base.returncode == 0, base.stderr
    assert base.stdout.splitlines()[:2] == ["egress:", "  mode: block"]
    allow = [line.strip()[2:] for line in base.stdout.splitlines() if line.strip().startswith("- ")]
    assert allow == ["api.example.test:443", "files.example.test:443", "v6.example.test:80"]
    refused = [line for line in base.stderr.splitlines() if "internal.example.test" in line]
    assert len(refused) == 1 and "the entry it needs: egress_internal_allow" in refused[0]


def test_on_violation_kill_stops_the_job(net: Net, stockade_home: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    job = run(net, stockade_home, tmp_path,
              "{mode: block, allow: [api.example.test], on_violation: kill}", f"""
        {CURL} https://api.example.test/before
        curl -s --max-time 5 https://evil.example.test/ || true
        sleep 60
    """, "echo SECOND-STEP-RAN")
    assert job.rc == 1
    assert (job.result["status"], job.result["failure_reason"]) == ("failed",
                                                                     "egress_violation")
    assert "SECOND-STEP-RAN" not in job.log
    assert time.monotonic() - started < 40


def test_malformed_requests_do_not_disturb_other_jobs(net: Net, stockade_home: Path,
                                                     tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    attacker = start(net, stockade_home, tmp_path / "a", "{mode: block, allow: []}", """
        python3 - <<'PY'
        import socket, time
        def talk(data, wait=5):
            s = socket.create_connection(("127.0.0.1", 3128), timeout=wait)
            s.sendall(data)
            try:
                return s.recv(200).split(b"\\r\\n")[0].decode()
            except OSError as e:
                return str(e)
        print("GARBAGE", talk(b"\\x00\\xff garbage\\r\\n\\r\\n"))
        print("HUGE", talk(b"GET http://x/ HTTP/1.1\\r\\nX: " + b"a" * 100000 + b"\\r\\n\\r\\n"))
        print("METHOD", talk(b"BREW http://x/ HTTP/1.1\\r\\n\\r\\n"))
        print("ORIGIN", talk(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"))
        slow = [socket.create_connection(("127.0.0.1", 3128)) for _ in range(40)]
        for s in slow:
            s.sendall(b"GET http://api.example.test/ HTTP/1.1\\r\\n")
        start = time.monotonic()
        print("SLOWLORIS", slow[0].recv(200).split(b"\\r\\n")[0].decode(),
              round(time.monotonic() - start))
        print("STILL-SERVING", talk(b"CONNECT evil.example.test:443 HTTP/1.1\\r\\n\\r\\n"))
        PY
    """, STOCKADE_EGRESS_HEADER_TIMEOUT="3")
    time.sleep(0.5)
    victim = run(net, stockade_home, tmp_path / "b", "{mode: block, allow: [api.example.test]}",
                 f"for i in 1 2 3 4 5; do {CURL} https://api.example.test/ok$i; sleep 0.3; done")
    bad = finish(attacker, stockade_home)
    assert victim.rc == 0 and victim.log.count("hello from 198.51.100.11") == 5
    assert "GARBAGE HTTP/1.1 400" in bad.log
    assert "HUGE HTTP/1.1 431" in bad.log
    assert "METHOD HTTP/1.1 405" in bad.log
    assert "ORIGIN HTTP/1.1 400" in bad.log
    assert "SLOWLORIS HTTP/1.1 408" in bad.log
    assert "STILL-SERVING HTTP/1.1 403" in bad.log


def test_concurrent_jobs_keep_their_own_rules(net: Net, stockade_home: Path,
                                              tmp_path: Path) -> None:
    script = f"""
        {CURL} https://api.example.test/x -o /dev/null -w "api %{{http_code}}\\n" || true
        {CURL} https://files.example.test/x -o /dev/null -w "files %{{http_code}}\\n" || true
        sleep 1
        {CURL} https://api.example.test/x -o /dev/null -w "api %{{http_code}}\\n" || true
        {CURL} https://files.example.test/x -o /dev/null -w "files %{{http_code}}\\n" || true
    """
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start(net, stockade_home, tmp_path / "a", "{mode: block, allow: [api.example.test]}",
              script)
    b = start(net, stockade_home, tmp_path / "b", "{mode: block, allow: [files.example.test]}",
              script)
    ja, jb = finish(a, stockade_home), finish(b, stockade_home)
    assert ja.result["egress"] == {"allowed": ["api.example.test:443"],
                                   "denied": ["files.example.test:443"], "audit_would_deny": []}
    assert jb.result["egress"] == {"allowed": ["files.example.test:443"],
                                   "denied": ["api.example.test:443"], "audit_would_deny": []}


def test_invalid_allow_entries_exit_2(stockade_home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\negress: {mode: block, allow: ['10.0.0.1:443']}\n"
                    "steps:\n  - {name: a, run: 'true'}\n")
    proc = run_cli(stockade_home, "run", str(spec))
    assert proc.returncode == 2
    assert "an IP address needs the CIDR form, e.g. 10.0.0.1/32:443" in proc.stderr


def test_decisions_are_audited_even_if_the_runner_dies(net: Net, stockade_home: Path,
                                                       tmp_path: Path) -> None:
    proc = start(net, stockade_home, tmp_path, "{mode: block, allow: [api.example.test]}",
                 f"{CURL} https://api.example.test/x; echo fetched; sleep 60")
    assert proc.stderr is not None
    for line in proc.stderr:
        if "fetched" in line:
            break
    time.sleep(1.5)  # decisions are written in batches every half second
    proc.kill()
    proc.wait()
    job_id = json.loads(run_cli(stockade_home, "jobs", "--json").stdout)[0]["job_id"]
    assert "egress.allowed" in run_cli(stockade_home, "show", job_id).stdout
    tidy = tmp_path / "tidy.yaml"  # the next run reaps what the killed runner left
    tidy.write_text("name: tidy\nsteps:\n  - {name: a, run: 'true'}\n")
    tidied = run_cli(stockade_home, "run", str(tidy), "--workspace", str(tmp_path))
    assert tidied.returncode == 0, tidied.stderr
    shown = json.loads(run_cli(stockade_home, "show", job_id, "--json").stdout)
    assert shown["failure_reason"] == "runner_lost"
    assert not job_dir(stockade_home, job_id).exists()


@pytest.mark.parametrize("entry", ["127.0.0.1/32:{port}", "169.254.169.254/32:80",
                                   "10.0.0.0/8:22", "[fe80::/10]:443",
                                   "[::ffff:127.0.0.0/104]:{port}"])
def test_a_spec_cannot_open_internal_destinations(net: Net, stockade_home: Path,
                                                  tmp_path: Path, entry: str) -> None:
    entry = entry.format(port=net.listener.port)
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\negress: {{mode: block, allow: ['{entry}']}}\n"
                    "steps:\n  - {name: a, run: 'echo RAN'}\n")
    for command in ("run", "validate"):
        proc = run_cli(stockade_home, command, str(spec))
        assert proc.returncode == 2, (command, proc.stderr)
        assert repr(entry) in proc.stderr
        assert ("only the operator can open internal destinations: settings "
                "egress_internal_allow") in proc.stderr
        assert "RAN" not in proc.stderr
    assert net.listener.hits == 0


def test_only_the_operator_opens_internal_destinations_for_every_job(
        net: Net, stockade_home: Path, tmp_path: Path) -> None:
    service = InternalService("127.0.0.7")
    try:
        job = run(net, stockade_home, tmp_path, "{mode: block, allow: [api.example.test]}", f"""
            curl -sS --max-time 5 http://127.0.0.7:{service.port}/
            curl -sS --max-time 5 http://127.0.0.7:{net.listener.port}/ || true
        """, STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.7/32:{service.port}")
    finally:
        service.close()
    assert job.rc == 0, job.stderr
    assert "internal service says hi" in job.log
    assert job.result["egress"]["allowed"] == [f"127.0.0.7:{service.port}"]
    assert job.result["egress"]["denied"] == [f"127.0.0.7:{net.listener.port}"]


RECORDER = r"""
import socket, sys, threading
addr, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(16)
lock = threading.Lock()
def serve(conn):
    conn.settimeout(2)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nrecorded\n")
        while True:  # keep reading: whatever else the proxy forwards is recorded too
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    with lock, open(out, "ab") as f:
        f.write(data + b"\n=====\n")
    conn.close()
open(sys.argv[4], "w").close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture
def recorder(net: Net, tmp_path: Path) -> Iterator[Path]:
    """A raw HTTP endpoint at api.example.test:8081 that records every byte it receives."""
    out, ready = tmp_path / "recorded", tmp_path / "recorder.ready"
    proc = subprocess.Popen(["ip", "netns", "exec", net.internet.ns, "python3", "-c", RECORDER,
                             "198.51.100.11", "8081", str(out), str(ready)])
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield out
    proc.kill()
    proc.wait()


def test_fronted_host_and_pipelined_requests_never_reach_upstream(
        net: Net, stockade_home: Path, tmp_path: Path, recorder: Path) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: ['api.example.test:8081']}",
              r"""
        python3 - <<'PY'
        import socket
        first = (b"GET http://api.example.test:8081/checked HTTP/1.1\r\n"
                 b"Host: evil.example.test\r\n\r\n")
        second = b"GET /pipelined HTTP/1.1\r\nHost: evil.example.test\r\n\r\n"
        body = (b"POST http://api.example.test:8081/body HTTP/1.1\r\nContent-Length: 4\r\n\r\n"
                b"abcdGET /smuggled HTTP/1.1\r\nHost: evil.example.test\r\n\r\n")
        chunked = (b"POST http://api.example.test:8081/chunked HTTP/1.1\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /te HTTP/1.1\r\n\r\n")
        twice = (b"GET http://api.example.test:8081/twice HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        for name, data in (("FRONTED", first + second), ("BODY", body),
                           ("CHUNKED", chunked), ("TWO-HOSTS", twice)):
            s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
            s.sendall(data)
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except OSError as e:
                answer += str(e).encode()
            print(name, answer.split(b"\r\n")[0].decode(), answer.count(b"HTTP/1.1"))
        PY
    """)
    assert job.rc == 0, job.stderr
    time.sleep(2.5)  # the recorder writes a connection down when it ends
    seen = recorder.read_bytes()
    for never in (b"evil", b"/pipelined", b"/smuggled", b"/chunked", b"/te", b"/twice"):
        assert never not in seen, (never, seen)
    assert seen.count(b"\n=====\n") == 2, seen
    assert b"GET /checked HTTP/1.1\r\nHost: api.example.test:8081\r\n" in seen
    assert b"POST /body HTTP/1.1\r\nHost: api.example.test:8081\r\n" in seen
    assert b"abcd\n=====\n" in seen
    assert "FRONTED HTTP/1.1 200 OK 1" in job.log
    assert "BODY HTTP/1.1 200 OK 1" in job.log
    assert "CHUNKED HTTP/1.1 411" in job.log
    assert "TWO-HOSTS HTTP/1.1 400" in job.log


RESPONDER = r"""
import http.server, sys
class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"hello from {sys.argv[1]}:{sys.argv[2]} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # a burst must measure the proxy, not this server's backlog
    daemon_threads = True
server = Server((sys.argv[1], int(sys.argv[2])), Hello)
open(sys.argv[3], "w").close()
server.serve_forever()
"""


@pytest.fixture
def responder(net: Net, tmp_path: Path) -> Iterator[None]:
    """A plain HTTP server at api.example.test:8082 with a deep listen backlog."""
    ready = tmp_path / "responder.ready"
    proc = subprocess.Popen(["ip", "netns", "exec", net.internet.ns, "python3", "-c",
                             RESPONDER, "198.51.100.11", "8082", str(ready)])
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield
    proc.kill()
    proc.wait()


def test_a_burst_of_connections_queues_instead_of_503(net: Net, stockade_home: Path,
                                                      tmp_path: Path, responder: None) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: ['api.example.test:8082']}",
              r"""
        python3 - <<'PY'
        import socket, threading
        from collections import Counter
        go, status = threading.Barrier(200), Counter()
        def fetch(i):
            s = socket.socket()
            go.wait()
            try:
                s.connect(("127.0.0.1", 3128))
                s.settimeout(60)
                s.sendall(f"GET http://api.example.test:8082/burst/{i} HTTP/1.1\r\n\r\n"
                          .encode())
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                ok = b"hello from 198.51.100.11:8082 path=/burst/%d\n" % i in answer
                status["ok" if ok else answer[:40].decode(errors="replace") or "empty"] += 1
            except OSError as e:
                status[type(e).__name__] += 1
        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(200)]
        for t in threads: t.start()
        for t in threads: t.join()
        print("BURST", dict(status))
        PY
    """)
    assert job.rc == 0, job.stderr
    assert "BURST {'ok': 200}" in job.log
    assert job.result["egress"]["allowed"] == ["api.example.test:8082"]


def test_a_denial_storm_leaves_a_bounded_result_and_audit_trail(
        net: Net, stockade_home: Path, tmp_path: Path) -> None:
    job = run(net, stockade_home, tmp_path, "{mode: block, allow: [api.example.test]}", r"""
        python3 - <<'PY'
        import socket
        def connect(target):
            s = socket.socket()
            s.connect(("127.0.0.1", 3128))
            s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            s.recv(100)
            s.close()
        for i in range(1000):
            connect(f"again{i % 2}.example.test:443")
        for i in range(3000):
            connect(f"d{i}.example.test:443")
        print("STORM DONE")
        PY
    """)
    assert job.rc == 0, job.stderr
    assert "STORM DONE" in job.log
    assert len(job.stdout) < 64 * 1024
    egress = job.result["egress"]
    assert len(egress["denied"]) == 256 and egress["truncated"] == 3000 - 254
    assert job.log.count("egress denied:") == 256
    assert job.log.count("further destinations are counted, not recorded") == 1
    rows = audit_rows(stockade_home, job.result["job_id"], "egress.denied")
    assert len(rows) <= 3 * 256
    counts = {row["host"]: 0 for row in rows}
    for row in rows:
        counts[row["host"]] += row["count"]
    assert counts["again0.example.test"] == counts["again1.example.test"] == 500
    assert counts["d0.example.test"] == 1 and len(counts) == 256
    [truncated] = audit_rows(stockade_home, job.result["job_id"], "egress.truncated")
    assert (truncated["destinations"], truncated["attempts"]) == (2746, 2746)


def test_a_secret_as_destination_is_never_kept_in_plain_text(net: Net, tmp_path: Path) -> None:
    home = tmp_path / "home"
    value = "Dest1nat1onS3cret" + os.urandom(4).hex()
    put = subprocess.run([STOCKADE, "secret", "set", "TOKEN"], input=value + "\n",
                         capture_output=True, text=True, env=cli_env(home))
    assert put.returncode == 0, put.stderr
    (tmp_path / "t").mkdir()
    path, ws = job_files(net, tmp_path / "t", spec_text(
        "{mode: block, allow: [api.example.test]}",
        "curl -s --max-time 5 https://$TOKEN.example.test/ || true\n"
        "curl -s --max-time 5 http://$TOKEN.example.test/ || true").replace(
        "egress: {", "secrets: [TOKEN]\negress: {"))
    proc = run_cli(home, "run", str(path), "--workspace", str(ws), "--json",
                   STOCKADE_EGRESS_HOSTS_FILE=str(net.hosts))
    job = JobRun(proc.returncode, json.loads(proc.stdout), proc.stdout, proc.stderr, home)
    assert job.rc == 0, job.stderr
    assert len(job.result["egress"]["denied"]) == 2
    audit = run_cli(home, "audit", "list", "--json").stdout
    shown = run_cli(home, "show", job.result["job_id"], "--json").stdout
    for text in (job.stdout, job.stderr, job.log, audit, shown):
        assert value.lower() not in text.lower()
    assert "egress.denied" in audit
