"""The CLI against ``stockade server`` over real HTTP (issue 9): the client's errors (no token, a
refused token or role, no server, a failing or unverifiable server) as exit codes 2 and 4 with
a hint and never a traceback; ``submit`` (workspace packed as ``run`` copies it, ``--json`` and
``--follow`` with run's exit codes); ``jobs``, ``show``, ``logs``, ``audit list`` and ``secret``
printing what they print locally; ``cancel``; ``runner`` administration."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.cli.remote import Remote
from stockade.errors import InfrastructureError
from stockade.sandbox.archive import ArchiveLimits, unpack
from tests.conftest import STOCKADE, cli_env, run_cli
from tests.support.fake_runner import ANY_CODE, FakeRunner
from tests.support.fleet import Server, admin_token, enrol_token

SPEC = "name: remote\nsteps:\n  - {name: a, run: 'cat README'}\n"
SLOW_LEASES = {"STOCKADE_RUNNER_LEASE": "60", "STOCKADE_RUNNER_HEARTBEAT": "2"}


class Fleet:
    def __init__(self, server: Server) -> None:
        self.server, self.home, self.url = server, server.home, server.url
        self.tokens = {role: admin_token(server.home, role) for role in
                       ("viewer", "submitter", "admin")}

    def cli(self, *args: str, role: str = "admin", input_text: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        """``stockade ARGS`` talking to the server with a token of ``role``."""
        env = cli_env(self.home, **{"STOCKADE_SERVER": self.url,
                                    "STOCKADE_TOKEN": self.tokens[role], **env})
        done = subprocess.run([STOCKADE, *args], capture_output=True, text=True, timeout=120,
                              env=env, input=input_text or "")
        assert "Traceback" not in done.stderr, done.stderr
        return done


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet-cli") / "home"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home, **ANY_CODE, **SLOW_LEASES)
    try:
        yield Fleet(server)
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the client's errors ----------------------------------------------------------------------

def test_without_a_token_the_client_says_which_variable(fleet: Fleet) -> None:
    done = run_cli(fleet.home, "jobs", "--server", fleet.url)
    assert done.returncode == 2 and "STOCKADE_TOKEN" in done.stderr
    assert "stockade token create" in done.stderr and done.stdout == ""


def test_a_refused_token_or_role_is_exit_2_naming_the_role(fleet: Fleet) -> None:
    done = fleet.cli("jobs", STOCKADE_TOKEN="stk_tnope_secret")
    assert done.returncode == 2 and "refused the API token" in done.stderr
    assert "stk_tnope_secret" not in done.stderr
    done = fleet.cli("runner", "list", role="viewer")
    assert done.returncode == 2 and "admin role" in done.stderr
    assert "hint: put an admin's token in STOCKADE_TOKEN" in done.stderr
    job = fleet.server.call("POST", "/api/v1/jobs", fleet.tokens["admin"], {"spec": SPEC})
    done = fleet.cli("cancel", job[1]["job_id"], role="viewer")
    assert done.returncode == 2 and "submitter role" in done.stderr
    assert fleet.cli("cancel", job[1]["job_id"]).returncode == 0  # no job left queued


def test_a_refusal_that_is_not_the_role_s_says_what_it_is(fleet: Fleet,
                                                          tmp_path: Path) -> None:
    """A submitter's token that may submit some refs only: a job of another ref is refused
    for its ref (it said the token needs the submitter role); a server's reason of several
    lines (a spec over the server's ceilings) is shown as lines, not with a literal \\n."""
    made = fleet.cli("token", "create", "ci-main", "--role", "submitter", "--refs",
                     "refs/heads/*")
    assert made.returncode == 0, made.stderr
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    done = fleet.cli("submit", str(spec), "--workspace", str(tmp_path), role="submitter",
                     STOCKADE_TOKEN=made.stdout.strip())
    assert done.returncode == 2 and "refs matching" in done.stderr, done.stderr
    assert "submitter role" not in done.stderr and "hint: pass --ref" in done.stderr
    spec.write_text(SPEC + "resources: {memory: 1Ti}\n")
    done = fleet.cli("submit", str(spec), "--workspace", str(tmp_path), role="submitter")
    assert done.returncode == 2 and "\n  resources.memory" in done.stderr, done.stderr
    assert "\\n" not in done.stderr


def test_no_server_there_is_exit_4(fleet: Fleet) -> None:
    done = fleet.cli("jobs", STOCKADE_SERVER=f"http://127.0.0.1:{_free_port()}")
    assert done.returncode == 4 and "cannot reach the stockade server" in done.stderr
    assert "hint:" in done.stderr


@pytest.mark.parametrize("url", ["http://example.com:8377", "ftp://127.0.0.1/", "not a url",
                                 "http://user@127.0.0.1:1", "http://127.0.0.1:abc",
                                 "http://[::1", "http://127.0.0.1:99999"])
def test_a_url_the_token_must_not_go_to_is_refused(fleet: Fleet, url: str) -> None:
    done = fleet.cli("jobs", STOCKADE_SERVER=url)
    assert done.returncode == 2 and done.stdout == ""
    assert "not a server URL" in done.stderr or "in the clear" in done.stderr


@pytest.mark.parametrize("token", ["stk_\u00e9", "stk_a\nb", "stk_a b", "stk_a\x1bb"])
def test_a_token_no_server_gave_is_refused_without_being_shown(fleet: Fleet,
                                                                token: str) -> None:
    done = fleet.cli("jobs", STOCKADE_TOKEN=token)
    assert done.returncode == 2 and "not an API token" in done.stderr
    assert token.strip() not in done.stderr


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and ``body``, or never."""

    def do_GET(self) -> None:
        status, body = self.server.canned  # type: ignore[attr-defined]
        if status == 0:
            time.sleep(5)
            return
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if body.startswith("<") else
                         "application/json")
        self.send_header("Retry-After", "\u00b2")  # (a digit to str.isdigit only)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_failing_server_is_exit_4_and_its_words_are_escaped(
        fleet: Fleet, canned: http.server.ThreadingHTTPServer) -> None:
    canned.canned = (500, json.dumps({"detail": "boom\x1b[2J"}))  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{canned.server_address[1]}"
    done = fleet.cli("jobs", STOCKADE_SERVER=url)
    assert done.returncode == 4 and "server failed (500)" in done.stderr
    assert "\x1b" not in done.stderr and "boom\\x1b[2J" in done.stderr


def test_a_web_server_that_is_not_stockade_is_named_as_such(
        fleet: Fleet, canned: http.server.ThreadingHTTPServer) -> None:
    canned.canned = (200, "<html>welcome</html>")  # type: ignore[attr-defined]
    done = fleet.cli("jobs", STOCKADE_SERVER=f"http://127.0.0.1:{canned.server_address[1]}")
    assert done.returncode == 4 and "not JSON (text/html)" in done.stderr
    assert "is STOCKADE_SERVER" in done.stderr


def test_a_server_that_does_not_answer_times_out(
        canned: http.server.ThreadingHTTPServer) -> None:
    canned.canned = (0, "")  # type: ignore[attr-defined]
    remote = Remote(f"http://127.0.0.1:{canned.server_address[1]}", "stk_t_x", timeout=0.5)
    with pytest.raises(InfrastructureError, match="did not answer in time"):
        remote.json("GET", "/api/v1/jobs", "viewer")


def _certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stockade test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_is_verified_against_the_system_or_the_given_ca(
        fleet: Fleet, canned: http.server.ThreadingHTTPServer, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    canned.socket = context.wrap_socket(canned.socket, server_side=True)
    canned.canned = (200, "[]")  # type: ignore[attr-defined]
    url = f"https://127.0.0.1:{canned.server_address[1]}"
    done = fleet.cli("jobs", "--json", STOCKADE_SERVER=url)
    assert done.returncode == 4 and "STOCKADE_CA_FILE" in done.stderr, done.stderr
    done = fleet.cli("jobs", "--json", STOCKADE_SERVER=url, STOCKADE_CA_FILE=str(cert))
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr
    done = fleet.cli("jobs", STOCKADE_SERVER=url, STOCKADE_CA_FILE=str(tmp_path / "none"))
    assert done.returncode == 2 and "STOCKADE_CA_FILE" in done.stderr


# -- submit -----------------------------------------------------------------------------------

def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / ".venv").mkdir(parents=True)
    (ws / ".venv" / "big").write_bytes(b"x" * 4096)
    (ws / "README").write_text("hello from the workspace\n")
    (ws / "notes.tmp").write_text("scratch\n")
    (ws / ".stockadeignore").write_text(".venv/\n")
    (tmp_path / "job.yaml").write_text(SPEC)
    return ws


def test_submit_packs_the_workspace_as_run_copies_it(fleet: Fleet, tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    done = fleet.cli("submit", str(tmp_path / "job.yaml"), "--workspace", str(ws),
                     "--exclude", "*.tmp", role="submitter")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert "queued" in done.stderr and job_id.startswith("j")
    runner = FakeRunner(fleet.url, enrol_token(fleet.home), "packer")
    a = runner.claim()
    assert a["job_id"] == job_id
    archive = tmp_path / "ws.tgz"
    archive.write_bytes(runner.workspace(a))
    unpack(archive, tmp_path / "out", ArchiveLimits(), a["workspace_sha256"])
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert got == [".stockadeignore", "README"]
    assert runner.complete(a) == 200
    runner.close()


def test_submit_json_of_a_denied_job_exits_3_with_the_result(fleet: Fleet,
                                                              tmp_path: Path) -> None:
    """No runner needed: the submitter's token is capped at untrusted, and an untrusted job
    may not ask for egress."""
    spec = tmp_path / "job.yaml"
    spec.write_text("name: wants-out\negress: {mode: block, allow: [pypi.org]}\n"
                    "steps:\n  - {name: a, run: 'true'}\n")
    (tmp_path / "ws").mkdir()
    forks = admin_token(fleet.home, "submitter", trust="untrusted")
    done = fleet.cli("submit", str(spec), "--workspace", str(tmp_path / "ws"), "--json",
                     STOCKADE_TOKEN=forks)
    assert done.returncode == 3, done.stderr
    result = json.loads(done.stdout)
    assert len(done.stdout.splitlines()) == 1
    assert (result["status"], result["failure_reason"]) == ("denied", "policy_denied")
    assert "denied" in done.stderr


def test_submit_refuses_a_bad_spec_before_anything_is_sent(fleet: Fleet,
                                                          tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nstep: []\n")
    before = fleet.cli("jobs", "--json", "--limit", "1000").stdout
    done = fleet.cli("submit", str(spec), "--json", role="submitter")
    assert done.returncode == 2 and done.stdout == "" and "steps" in done.stderr
    assert fleet.cli("jobs", "--json", "--limit", "1000").stdout == before
    done = run_cli(fleet.home, "submit", str(spec))
    assert done.returncode == 2 and "STOCKADE_SERVER" in done.stderr


def test_submit_follow_streams_the_log_and_exits_as_run_does(fleet: Fleet,
                                                            tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    env = cli_env(fleet.home, STOCKADE_SERVER=fleet.url, STOCKADE_TOKEN=fleet.tokens["admin"])
    proc = subprocess.Popen([STOCKADE, "submit", str(tmp_path / "job.yaml"), "--workspace",
                             str(ws), "--follow", "--json"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    runner = FakeRunner(fleet.url, enrol_token(fleet.home), "follower")
    try:
        a = runner.claim(wait=30)
        assert runner.log(a, 0, b"10:00:00 ==> step a\n") == 201
        time.sleep(0.5)
        assert runner.log(a, 1, b"10:00:01 | oops \\x1b[31m\n") == 201
        assert runner.complete(a, "failed") == 200
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        runner.close()
    assert proc.returncode == 1, err
    assert "==> step a\n" in err and "| oops \\x1b[31m\n" in err
    result = json.loads(out)
    assert (result["job_id"], result["status"]) == (a["job_id"], "failed")


# -- the same commands, here and there --------------------------------------------------------

def test_jobs_show_logs_and_audit_print_the_same_here_and_there(fleet: Fleet,
                                                               tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    ran = run_cli(fleet.home, "run", str(tmp_path / "job.yaml"), "--workspace", str(ws),
                  "--json")
    assert ran.returncode == 0, ran.stderr
    job_id = json.loads(ran.stdout)["job_id"]
    for args in (["jobs"], ["jobs", "--json", "--limit", "5"], ["show", job_id],
                 ["show", job_id[:12], "--json"], ["logs", job_id],
                 ["audit", "list", "--job", job_id], ["audit", "list", "--json"]):
        here = run_cli(fleet.home, *args)
        there = fleet.cli(*args)
        assert (there.returncode, there.stdout) == (here.returncode, here.stdout), args
    assert "hello from the workspace" in fleet.cli("logs", job_id).stdout
    viewer = fleet.cli("show", job_id, role="viewer")
    assert viewer.returncode == 0 and "admin tokens only" in viewer.stdout
    again = run_cli(fleet.home, "run", str(tmp_path / "job.yaml"), "--workspace", str(ws))
    assert again.returncode == 0, again.stderr  # so that "j" names two jobs, whatever ran before
    for args in (["show", "jzzzz"], ["logs", "j"], ["show", "bad id"]):
        here, there = run_cli(fleet.home, *args), fleet.cli(*args)
        assert here.returncode == there.returncode == 2, (args, there.stderr)


def test_logs_follow_a_servers_job_until_it_ends(fleet: Fleet) -> None:
    submitted = fleet.server.call("POST", "/api/v1/jobs", fleet.tokens["admin"],
                                  {"spec": SPEC})[1]["job_id"]
    env = cli_env(fleet.home, STOCKADE_SERVER=fleet.url, STOCKADE_TOKEN=fleet.tokens["viewer"])
    proc = subprocess.Popen([STOCKADE, "logs", "-f", submitted], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runner = FakeRunner(fleet.url, enrol_token(fleet.home), "tail")
    try:
        a = runner.claim(wait=30)
        for seq, line in enumerate((b"one\n", b"two\x1b[0m\n")):
            assert runner.log(a, seq, line) == 201
        assert runner.complete(a) == 200
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        runner.close()
    assert (proc.returncode, out) == (0, "one\ntwo\\x1b[0m\n"), err
    for args in (["logs", submitted], ["logs", "-f", submitted]):  # the chunks, read here
        assert run_cli(fleet.home, *args).stdout == out, args


def test_secrets_through_the_server(fleet: Fleet) -> None:
    value = "remote-secret-value-1234"
    done = fleet.cli("secret", "set", "API_KEY", "--refs", "refs/heads/main",
                     input_text=value)
    assert done.returncode == 0 and "stored (version 1)" in done.stdout, done.stderr
    changed = fleet.cli("secret", "set", "API_KEY", "--trust", "protected", input_text=value)
    assert "scope of API_KEY changed" in changed.stderr
    assert "refs=refs/heads/main" in changed.stderr  # the refs kept
    assert "rotated (version 3)" in fleet.cli("secret", "rotate", "API_KEY",
                                              input_text=value).stdout
    there = fleet.cli("secret", "list")
    assert there.stdout == run_cli(fleet.home, "secret", "list").stdout
    assert "API_KEY" in there.stdout and value not in there.stdout
    short = fleet.cli("secret", "set", "OTHER", input_text="ab")
    assert short.returncode == 2 and "shorter than 4" in short.stderr
    assert fleet.cli("secret", "list", role="submitter").returncode == 2
    assert fleet.cli("secret", "rm", "API_KEY").stdout == "secret API_KEY removed\n"
    gone = fleet.cli("secret", "rm", "API_KEY")
    assert gone.returncode == 2 and "hint: list secrets with: stockade secret list" in gone.stderr
    assert fleet.cli("secret", "rm", "../jobs").returncode == 2


def test_cancel_here_and_there(fleet: Fleet) -> None:
    token = fleet.tokens["submitter"]
    queued = fleet.server.call("POST", "/api/v1/jobs", token, {"spec": SPEC})[1]["job_id"]
    done = fleet.cli("cancel", queued, role="submitter")
    assert (done.returncode, done.stdout) == (0, f"job {queued} canceled\n"), done.stderr
    again = fleet.cli("cancel", queued, role="submitter")
    assert again.returncode == 2 and "finished" in again.stderr
    other = fleet.server.call("POST", "/api/v1/jobs", token, {"spec": SPEC})[1]["job_id"]
    local = run_cli(fleet.home, "cancel", other)
    assert (local.returncode, local.stdout) == (0, f"job {other} canceled\n"), local.stderr
    assert run_cli(fleet.home, "cancel", other).returncode == 2


def test_runners_are_enrolled_and_managed_from_the_cli(fleet: Fleet) -> None:
    made = fleet.cli("runner", "enrol-token", "--pool", "cli", "--ttl", "5m")
    assert made.returncode == 0 and "shown once" in made.stderr
    runner = FakeRunner(fleet.url, made.stdout.strip(), "managed-cli")
    listed = json.loads(fleet.cli("runner", "list", "--json").stdout)
    assert {(r["runner_id"], r["pool"], r["status"]) for r in listed} >= \
        {(runner.runner_id, "cli", "active")}
    assert fleet.cli("runner", "list").stdout == run_cli(fleet.home, "runner", "list").stdout
    assert fleet.cli("runner", "drain", runner.runner_id).stdout.endswith("draining\n")
    assert run_cli(fleet.home, "runner", "resume", runner.runner_id).stdout.endswith(
        "active\n")
    nobody = fleet.cli("runner", "drain", "r-nobody")
    assert nobody.returncode == 2 and "hint: list runners with: stockade runner" in nobody.stderr
    assert fleet.cli("runner", "resume", runner.runner_id).returncode == 2  # not draining
    done = fleet.cli("runner", "quarantine", runner.runner_id)
    assert done.returncode == 0 and "quarantined" in done.stdout
    local = run_cli(fleet.home, "runner", "enrol-token", "--ttl", "200h")
    assert local.returncode == 2 and "7 days" in local.stderr
    runner.close()


class _BusyThenServed(http.server.BaseHTTPRequestHandler):
    """503 with Retry-After: 1 for the first ``busy`` requests, then the answer."""

    def _answer(self) -> None:
        server = self.server
        server.seen += 1  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if server.seen <= server.busy:  # type: ignore[attr-defined]
            body = b'{"detail": "this token has 16 logs being sent; try again"}'
            self.send_response(503)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
        elif self.command == "GET":
            body = b"event: end\ndata: {}\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
        else:
            body = b'{"sha256": "x"}'
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_busy_server_is_asked_again_as_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 (the server's streams or uploads taken, some by this very token: a CI system's
    parallel jobs) is asked again after its Retry-After for up to an hour, not given up after
    a minute's reconnects (a follower) or four tries (an upload)."""
    import stockade.cli.remote as remote_module

    monkeypatch.setattr(remote_module, "RECONNECT_FOR_S", 0.5)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BusyThenServed)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = Remote(f"http://127.0.0.1:{server.server_address[1]}", "stk_t_x")
        server.seen, server.busy = 0, 3  # type: ignore[attr-defined]
        assert [e.kind for e in remote.events("/api/v1/jobs/j/log/stream", "viewer")] == ["end"]
        server.seen, server.busy = 0, 6  # type: ignore[attr-defined]
        started = time.monotonic()
        assert remote.upload("/api/v1/workspaces", "submitter", b"x", {}) == {"sha256": "x"}
        assert 5 < time.monotonic() - started < 30
    finally:
        server.shutdown()
        server.server_close()
