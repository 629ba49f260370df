"""``stockade server`` at its edges, over real sockets: connections that never finish a request
head, one host holding many connections, trickled bodies, many log streams, and what clients
send that errors must not repeat; the live log client against a hostile chunk."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stockade.sandbox.archive import pack
from stockade.sandbox.interface import WorkspaceSource
from tests.conftest import run_cli
from tests.support.fake_runner import ANY_CODE, FakeRunner
from tests.support.fleet import Server, admin_token, enrol_token

SPEC = "name: edges\nsteps:\n  - {name: a, run: 'true'}\n"
SLOW_LEASES = {"STOCKADE_RUNNER_LEASE": "60", "STOCKADE_RUNNER_HEARTBEAT": "2"}
HALF_A_HEAD = b"GET /api/v1/jobs HTTP/1.1\r\nHost: stockade\r\n"


class Fleet:
    """A server, an admin's and a viewer's token, and a runner holding a job."""

    def __init__(self, server: Server) -> None:
        self.server, self.url, self.home = server, server.url, server.home
        self.admin = admin_token(server.home)
        self.viewer = admin_token(server.home, "viewer")
        self.submitter = admin_token(server.home, "submitter")

    def runner_with_a_job(self) -> tuple[FakeRunner, dict[str, object]]:
        job = httpx.post(f"{self.url}/api/v1/jobs", json={"spec": SPEC}, timeout=30,
                         headers={"Authorization": f"Bearer {self.submitter}"})
        assert job.status_code == 201, job.text
        runner = FakeRunner(self.url, enrol_token(self.home))
        return runner, runner.claim()

    def fresh(self, token: str) -> httpx.Client:
        """A client with no connection yet."""
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    home = tmp_path / "home"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home, **ANY_CODE, **SLOW_LEASES)
    try:
        yield Fleet(server)
    finally:
        server.stop()


def _connect(port: int, source: str, first: bytes = b"") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if first:
        sock.sendall(first)
    return sock


def _idle(port: int, source: str, n: int) -> list[socket.socket]:
    """``n`` connections from ``source``: half say nothing, half half a request head."""
    return [_connect(port, source, HALF_A_HEAD if i % 2 else b"") for i in range(n)]


def _closed(sock: socket.socket, wait: float = 0.0) -> bool:
    """Whether the server closed ``sock`` (what it said before is read and dropped)."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return True


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _still_open(socks: list[socket.socket]) -> int:
    time.sleep(0.5)
    return sum(not _closed(s) for s in socks)


def _served_under_attack(fleet: Fleet, held: tuple[FakeRunner, dict[str, object]] | None = None
                         ) -> float:
    """The time a runner's heartbeat and a viewer's request take on new connections (the
    runner enrolled and holding a job now, or ``held``)."""
    runner, a = held or fleet.runner_with_a_job()
    started = time.monotonic()
    with fleet.fresh(fleet.viewer) as viewer, httpx.Client(
            base_url=fleet.url, timeout=30, headers=dict(runner.http.headers)) as session:
        beat = session.post(f"/api/v1/runner/jobs/{a['job_id']}/{a['attempt']}/heartbeat")
        listed = viewer.get("/api/v1/jobs")
    took = time.monotonic() - started
    assert beat.status_code == 200 and beat.json()["held"], beat.text
    assert listed.status_code == 200, listed.text
    runner.close()
    return took


def test_idle_connections_of_one_host_do_not_deny_the_api(fleet: Fleet) -> None:
    """300 silent or half-spoken connections from this host: the server keeps 64 of them
    (a new one takes the place of the one that waited longest) and serves everyone else."""
    attack = _idle(fleet.server.port, "127.0.0.1", 300)
    try:
        took = _served_under_attack(fleet)
        assert took < 3, took
        assert _still_open(attack) <= 64
    finally:
        _close_all(attack)


def test_idle_connections_of_other_hosts_do_not_deny_the_api(fleet: Fleet) -> None:
    """Two hosts with 300 idle connections each: at most 64 each stay, runners and people on
    a third are served at once."""
    attack = [s for host in ("127.0.0.2", "127.0.0.3")
              for s in _idle(fleet.server.port, host, 300)]
    try:
        took = _served_under_attack(fleet)
        assert took < 3, took
        assert _still_open(attack[:300]) <= 64 and _still_open(attack[300:]) <= 64
    finally:
        _close_all(attack)


def _trickle(sock: socket.socket, every: float, stop: threading.Event,
             piece: bytes = b"X") -> None:
    """Send ``piece`` every ``every`` seconds until the server answers or ``stop``."""
    while not stop.is_set() and not select.select([sock], [], [], every)[0]:
        try:
            sock.sendall(piece)
        except OSError:
            return


def _closed_after(sock: socket.socket, started: float, limit: float) -> tuple[float, bytes]:
    """When the server closed ``sock`` (seconds after ``started``) and what it said."""
    said = b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            said += chunk
    except OSError:
        pass
    return time.monotonic() - started, said


def test_a_request_head_must_come_within_ten_seconds_however_it_trickles(
        fleet: Fleet) -> None:
    silent = _connect(fleet.server.port, "127.0.0.4")
    half = _connect(fleet.server.port, "127.0.0.4", HALF_A_HEAD)
    trickled = _connect(fleet.server.port, "127.0.0.4", b"GET /healthz HTTP/1.1\r\nX-A: ")
    kept = _connect(fleet.server.port, "127.0.0.4", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    started, stop = time.monotonic(), threading.Event()
    assert b" 200 " in kept.recv(65536)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nX-A: ")  # then the next head trickles
    threads = [threading.Thread(target=_trickle, args=(s, 0.5, stop)) for s in (trickled, kept)]
    for t in threads:
        t.start()
    try:
        ends = {name: _closed_after(sock, started, 20) for name, sock in
                (("silent", silent), ("half", half), ("trickled", trickled), ("kept", kept))}
    finally:
        stop.set()
        for t in threads:
            t.join()
        _close_all([silent, half, trickled, kept])
    for name, (after, said) in ends.items():
        assert 9 < after < 12.5, (name, after)
        assert (b" 408 " in said) == (name != "silent"), (name, said)  # it heard something


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n",  # in one go
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 101 + b"\r\n"])
def test_a_whole_head_too_large_or_with_too_many_headers_gets_431(fleet: Fleet, head: bytes
                                                                    ) -> None:
    sock = _connect(fleet.server.port, "127.0.0.5", head)
    try:
        assert _answers(sock) == [b"HTTP/1.1 431 Request Header Fields Too Large"]
    finally:
        sock.close()


ENDLESS_HEADS = {  # how a head starts, and what it goes on with
    "header lines": (b"GET /healthz HTTP/1.1\r\n", b"X-Filler: " + b"a" * 1000 + b"\r\n"),
    "one header value": (b"GET /healthz HTTP/1.1\r\nX-Filler: ", b"a" * 1012),
    "one header name": (b"GET /healthz HTTP/1.1\r\nX-", b"a" * 1012),
    "the path": (b"GET /healthz", b"a" * 1012),
}


@pytest.mark.parametrize("shape", list(ENDLESS_HEADS))
def test_a_request_head_is_bounded_in_size(fleet: Fleet, shape: str) -> None:
    start, more = ENDLESS_HEADS[shape]
    endless = _connect(fleet.server.port, "127.0.0.5", start)
    started, sent = time.monotonic(), 0
    try:
        with pytest.raises(OSError):  # the server closes the connection: the send fails
            while sent < 64 * 1024 * 1024:  # (without a bound: all sent well within 10 s)
                endless.sendall(more)
                sent += len(more)
        after, said = _closed_after(endless, started, 5)
    finally:
        endless.close()
    assert sent < 16 * 1024 * 1024 and after < 5, (sent, after)  # socket buffers: a few MB
    assert said == b"" or b" 431 " in said, said  # (a reset may swallow the answer)
    big_but_fine = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 30_000 + b"\r\n\r\n"
    ok = _connect(fleet.server.port, "127.0.0.5", big_but_fine)
    try:
        ok.settimeout(10)
        assert b" 200 " in ok.recv(65536)
    finally:
        ok.close()


def _answers(sock: socket.socket, wait: float = 10) -> list[bytes]:
    """The status lines of what the server said until it closed ``sock`` (or ``wait``)."""
    said = _closed_after(sock, time.monotonic(), wait)[1]
    return re.findall(rb"HTTP/1\.1 [0-9]{3} [A-Za-z ]*", said)


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def test_pipelined_requests_are_answered_in_order_but_bounded(fleet: Fleet) -> None:
    """A few requests sent ahead are answered in turn; a flood of them in one write ends the
    connection (each would be held while the first is served), and nothing else suffers."""
    few = _connect(fleet.server.port, "127.0.0.8", HEALTHZ * 3 + HEALTHZ.replace(
        b"Host: x", b"Host: x\r\nConnection: close"))
    flood = _connect(fleet.server.port, "127.0.0.8", HEALTHZ * 5000)
    try:
        assert _answers(few) == [b"HTTP/1.1 200 OK"] * 4
        assert len(_answers(flood)) <= 5  # the connection closed, at most those queued answered
    finally:
        _close_all([few, flood])
    assert _served_under_attack(fleet) < 3


@pytest.mark.parametrize(("framing", "status"), [
    (b"Transfer-Encoding: chunked\r\n", b"411 Length Required"),
    (b"Transfer-Encoding: gzip, chunked\r\n", b"411 Length Required"),
    (b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n", b"400 Bad Request")])  # (smuggling)
def test_request_bodies_need_a_content_length(fleet: Fleet, framing: bytes, status: bytes
                                              ) -> None:
    """A body framed by Transfer-Encoding is refused and the connection closes before anything
    reads it (a chunked body's trailers would be held whole); nothing was enrolled."""
    sock = _connect(fleet.server.port, "127.0.0.9", b"POST /api/v1/enrol HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n" + framing + b"\r\n1\r\n{\r\n0\r\n"
                    + b"X-Trailer: " + b"a" * 1000 + b"\r\n\r\n" + HEALTHZ)
    try:
        assert _answers(sock) == [b"HTTP/1.1 " + status]
    finally:
        sock.close()
    listed = run_cli(fleet.home, "runner", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/9.9"])
def test_only_http_1_0_and_1_1_are_served(fleet: Fleet, version: bytes) -> None:
    sock = _connect(fleet.server.port, "127.0.0.9", b"GET /healthz " + version + b"\r\n"
                    b"Host: x\r\n\r\n" + HEALTHZ)
    try:
        answers = _answers(sock)
    finally:
        sock.close()
    assert answers in ([b"HTTP/1.1 505 HTTP Version Not Supported"],
                       [b"HTTP/1.1 400 Bad Request"]), answers  # (nothing after it read)


UPGRADE = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")


def test_an_upgrade_request_is_served_as_a_plain_one_then_the_connection_ends(
        fleet: Fleet) -> None:
    """``curl --http2`` over plain HTTP asks to upgrade to h2c: it is answered over HTTP/1.1,
    and nothing sent after it on that connection is taken for a request, in the same write or
    a later one (llhttp would have parsed on after the upgrade)."""
    sock = _connect(fleet.server.port, "127.0.0.9", UPGRADE + HEALTHZ)
    later = _connect(fleet.server.port, "127.0.0.9", UPGRADE)
    try:
        time.sleep(0.5)
        later.sendall(HEALTHZ)
        assert _answers(sock) == [b"HTTP/1.1 200 OK"]
        assert _answers(later) == [b"HTTP/1.1 200 OK"]
    finally:
        _close_all([sock, later])


@pytest.mark.parametrize("later", [False, True])
def test_an_upgrade_request_gets_its_body_and_nothing_after_it_is_a_request(
        fleet: Fleet, later: bool) -> None:
    """llhttp stops at an upgrade request's head: its body (``curl --http2 -d``) is handed
    over as the request's, in the same write or a later one, and what follows it is never
    taken for another request (it smuggled requests past a proxy keeping HTTP framing)."""
    body = b'{"nonce": 1}'
    smuggled = b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n"
    head = (b"POST /api/v1/enrol HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    sock = _connect(fleet.server.port, "127.0.0.9", head if later else head + body + smuggled)
    try:
        if later:
            time.sleep(0.3)
            sock.sendall(body[:5])
            time.sleep(0.3)
            sock.sendall(body[5:] + smuggled)
        said = _closed_after(sock, time.monotonic(), 10)[1]
    finally:
        sock.close()
    assert re.findall(rb"HTTP/1\.1 [0-9]{3}", said) == [b"HTTP/1.1 422"], said  # (its body)
    assert b"nonce" in said  # the enrolment read the body: what it lacks is named


def test_requests_without_credentials_take_a_share_of_the_server_at_most(fleet: Fleet) -> None:
    """Enrolments whose bodies never come (no credentials needed) hold at most 4 requests of
    one address, 32 of all, each for 5 s: the rest get 503 at once; runners and people are
    served meanwhile, health checks answer, and another address still enrols."""
    head = (b"POST /api/v1/enrol HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    runner = fleet.runner_with_a_job()
    held = [_connect(fleet.server.port, f"127.0.1.{n % 2 + 1}", head) for n in range(30)]
    try:
        time.sleep(1.0)
        assert _served_under_attack(fleet, runner) < 3
        assert httpx.get(f"{fleet.url}/healthz", timeout=5).status_code == 200
        FakeRunner(fleet.url, enrol_token(fleet.home)).close()  # enrols, from 127.0.0.1
        said = [_answers(sock, 15) for sock in held]
        assert sum(a == [b"HTTP/1.1 408 Request Timeout"] for a in said) == 8, said
        assert sum(a == [b"HTTP/1.1 503 Service Unavailable"] for a in said) == 22, said
    finally:
        _close_all(held)


def test_a_runners_completion_is_held_as_a_request_without_credentials_until_its_body_is_in(
        fleet: Fleet) -> None:
    """A small completion is read whole before its session is checked (``Gate._at_once``):
    one whose body has not come holds a slot of the requests without credentials, 4 of one
    address at most, for 5 s at most; then, or if no slot is free, its session is checked
    first (a bad one: 401). Runners and people are served meanwhile; a runner's completion
    that trickles in over a slow link for longer than that is recorded."""
    head = (b"POST /api/v1/runner/jobs/j1/1/complete HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer stks_nope_nope\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    runner, a = fleet.runner_with_a_job()
    started = time.monotonic()
    held = [_connect(fleet.server.port, "127.0.1.3", head) for _ in range(6)]
    said: dict[socket.socket, tuple[float, bytes]] = {}
    try:
        time.sleep(0.5)
        assert _served_under_attack(fleet, (runner, a)) < 3
        while len(said) < len(held) and time.monotonic() - started < 15:
            ready, _, _ = select.select([s for s in held if s not in said], [], [], 0.2)
            for sock in ready:
                said[sock] = (time.monotonic() - started, sock.recv(65536))
    finally:
        _close_all(held)
    answers = sorted((at, re.findall(rb"HTTP/1\.1 [0-9]{3}", text)) for at, text in said.values())
    assert [status for _, status in answers] == [[b"HTTP/1.1 401"]] * 6, answers
    assert all(at < 3 for at, _ in answers[:2]) and all(4.5 < at < 9 for at, _ in answers[2:])
    # a completion trickling in over 6 s, from the runner holding the job
    body = json.dumps({"status": "succeeded", "duration_s": 0.1}).encode()
    slow = _connect(fleet.server.port, "127.0.1.4", (
        f"POST /api/v1/runner/jobs/{a['job_id']}/{a['attempt']}/complete HTTP/1.1\r\n"
        f"Host: x\r\nAuthorization: {runner.http.headers['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode())
    try:
        for n in range(len(body)):
            slow.sendall(body[n:n + 1])
            time.sleep(6 / len(body))
        answer = _closed_after(slow, time.monotonic(), 3)[1]
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b'"recorded":true' in answer


def _server_side_open(server_port: int, client: socket.socket) -> bool:
    """Whether the server still holds its end of ``client``'s connection (/proc/net/tcp)."""
    port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == server_port and \
                int(remote.split(":")[1], 16) == port and state != "07":  # 07: CLOSE
            return True
    return False


def test_a_client_that_reads_no_response_is_dropped(fleet: Fleet) -> None:
    """A client that asks for responses and reads none held its connection (and the request
    being served) for ever: once it has read nothing for 30 s the server drops it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.bind(("127.0.0.10", 0))
    sock.connect(("127.0.0.1", fleet.server.port))
    started = time.monotonic()
    try:
        for _ in range(40):  # 40 schemas of 30 kB: more than the socket buffers hold
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.03)
        time.sleep(5)
        assert _server_side_open(fleet.server.port, sock)  # stalled, not gone
        while _server_side_open(fleet.server.port, sock) and time.monotonic() - started < 45:
            time.sleep(0.5)
        assert not _server_side_open(fleet.server.port, sock)
        assert time.monotonic() - started < 45
    finally:
        sock.close()


def test_a_large_response_read_slowly_is_not_cut_off(fleet: Fleet) -> None:
    """A client reading a 3 MB artifact at about 200 kB/s (15 s; the response is written
    whole at once and the connection closes behind it) gets all of it: only unsent bytes
    that do not move are dropped."""
    runner, a = fleet.runner_with_a_job()
    data = os.urandom(3 * 1024 * 1024)
    digest = runner.artifact(a, data)
    assert runner.complete(a, artifacts=[{"path": "big.bin", "sha256": digest,
                                          "size": len(data)}]) == 200
    runner.close()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", fleet.server.port))
    sock.sendall(f"GET /api/v1/jobs/{a['job_id']}/artifacts/big.bin HTTP/1.1\r\nHost: x\r\n"
                 f"Connection: close\r\nAuthorization: Bearer {fleet.viewer}\r\n\r\n".encode())
    got, started = b"", time.monotonic()
    try:
        sock.settimeout(20)
        while chunk := sock.recv(16 * 1024):
            got += chunk
            time.sleep(0.08)
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started > 12
    assert got.endswith(data), len(got)  # whole


def test_a_closed_pipelined_connection_ends_every_request_quietly(fleet: Fleet) -> None:
    """Requests queued behind another on a connection closed by a pipeline flood end with
    it: the one being served writes nothing to the closed connection (no traceback for each
    in the server's log, which a client could fill)."""
    for _ in range(30):
        sock = _connect(fleet.server.port, "127.0.0.11", HEALTHZ * 6)
        sock.close()
    assert _served_under_attack(fleet) < 3
    fleet.server.stop()
    assert fleet.server.proc.stderr is not None
    log = fleet.server.proc.stderr.read()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def _stream(port: int, source: str, job: str, token: str) -> tuple[socket.socket, bytes]:
    sock = _connect(port, source, (f"GET /api/v1/jobs/{job}/log/stream HTTP/1.1\r\n"
                                   f"Host: x\r\nAuthorization: Bearer {token}\r\n\r\n").encode())
    sock.settimeout(10)
    return sock, sock.recv(4096)


def test_live_log_streams_are_bounded(fleet: Fleet) -> None:
    """64 at once per server process (16 of one token: four viewers here); the next gets 503
    with Retry-After until one ends."""
    job = httpx.post(f"{fleet.url}/api/v1/jobs", json={"spec": SPEC}, timeout=30,
                     headers={"Authorization": f"Bearer {fleet.submitter}"}).json()["job_id"]
    port, streams = fleet.server.port, []
    viewers = [fleet.viewer, *(admin_token(fleet.home, "viewer") for _ in range(4))]
    try:
        for i in range(64):  # from four hosts: one host may hold only 64 connections
            streams.append(_stream(port, f"127.0.0.{10 + i % 4}", job, viewers[i % 4]))
        assert all(b" 200 " in head for _, head in streams), [h for _, h in streams][:3]
        extra, head = _stream(port, "127.0.0.20", job, viewers[4])
        extra.close()
        assert b" 503 " in head and b"retry-after: 5" in head.lower(), head
        with fleet.fresh(fleet.viewer) as viewer:  # other requests are served meanwhile
            assert viewer.get(f"/api/v1/jobs/{job}").status_code == 200
        streams.pop()[0].close()  # (the 64th: the fourth viewer's)
        time.sleep(0.5)  # the server notices the client went at its next look
        again, head = _stream(port, "127.0.0.20", job, viewers[3])
        streams.append((again, head))
        assert b" 200 " in head, head
    finally:
        _close_all([s for s, _ in streams])


def _workspace(tmp_path: Path, size: int) -> bytes:
    tree = tmp_path / "ws"
    tree.mkdir()
    (tree / "noise").write_bytes(os.urandom(size))
    out = io.BytesIO()
    pack(WorkspaceSource(tree, ()), out, size * 2)
    return out.getvalue()


def _upload(fleet: Fleet, data: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with fleet.fresh(fleet.submitter) as client:
        answer = client.post("/api/v1/workspaces", content=data, timeout=20, headers={
            "X-Stockade-Sha256": hashlib.sha256(data).hexdigest()})
    return answer, time.monotonic() - started


def _trickling_body(port: int, source: str, head: bytes) -> tuple[socket.socket, float]:
    sock = _connect(port, source, head)
    return sock, time.monotonic()


def test_slow_bodies_neither_block_uploads_nor_last(fleet: Fleet, tmp_path: Path) -> None:
    """Four unauthenticated enrolments whose bodies trickle take no upload's turn (and end
    after 5 s); four trickled uploads, two of each of two tokens, take all four turns for 30 s
    at most, whatever size they declare (then 408: a body keeps pace with 1 MiB/s past the
    grace; one declaring 256 MiB held its turn 256 s), and meanwhile another upload gets 503
    with Retry-After after waiting 10 s for a turn, and a third of one token at once."""
    data = _workspace(tmp_path, 2 << 20)
    other = admin_token(fleet.home, "submitter")
    port, stop = fleet.server.port, threading.Event()
    uploads: list[tuple[socket.socket, float]] = []
    enrols = [_trickling_body(port, "127.0.0.5", b"POST /api/v1/enrol HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/json\r\n"
                              b"Content-Length: 100000\r\n\r\n{")
              for _ in range(4)]
    threads = [threading.Thread(target=_trickle, args=(s, 1.0, stop, b" "))
               for s, _ in enrols]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        answer, took = _upload(fleet, data)
        assert answer.status_code == 201 and took < 5, (answer.status_code, took)
        uploads += [_trickling_body(port, "127.0.0.6", (
            f"POST /api/v1/workspaces HTTP/1.1\r\nHost: x\r\nContent-Length: {256 << 20}\r\n"
            f"Authorization: Bearer {token}\r\nX-Stockade-Sha256: {'0' * 64}\r\n"
            "\r\n").encode() + data[:1000]) for token in (fleet.submitter, other) * 2]
        threads += [threading.Thread(target=_trickle, args=(s, 1.0, stop)) for s, _ in uploads]
        for t in threads[4:]:
            t.start()
        time.sleep(0.5)
        one_more, since = _trickling_body(port, "127.0.0.7", (
            f"POST /api/v1/workspaces HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Authorization: Bearer {fleet.admin}\r\n\r\n").encode() + data[:1000])
        took, said = _closed_after(one_more, since, 20)
        one_more.close()
        assert b" 503 " in said and b"retry-after: 5" in said.lower(), said
        assert 9 < took < 12, took
        third, since = _trickling_body(port, "127.0.0.7", (
            f"POST /api/v1/workspaces HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Authorization: Bearer {other}\r\n\r\n").encode() + data[:1000])
        took, said = _closed_after(third, since, 20)
        third.close()
        assert b" 503 " in said and b"2 uploads under way" in said and took < 2, (took, said)
        ends = [_closed_after(s, since, 40) for s, since in uploads]
        assert all(27 < after < 34 and b" 408 " in said for after, said in ends), ends
        ends = [_closed_after(s, since, 10) for s, since in enrols]  # (no credentials)
        assert all(b" 408 " in said and b"within 5 s" in said for _, said in ends), ends
        answer, took = _upload(fleet, data)
        assert answer.status_code == 201 and took < 5, (answer.status_code, took)
    finally:
        stop.set()
        for t in threads:
            t.join()
        _close_all([s for s, _ in enrols + uploads])


def test_errors_do_not_repeat_unknown_field_names(fleet: Fleet) -> None:
    for path, token, body in (
            ("/api/v1/jobs", fleet.submitter, {"spec": SPEC, "\x1b[2J\x1b]0;owned\x07": 1}),
            ("/api/v1/enrol", None, {"token": "x", "\x1b[31mzzredzz": 1})):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = httpx.post(fleet.url + path, content=json.dumps(body), timeout=30,
                            headers={"Content-Type": "application/json", **headers})
        assert answer.status_code == 422, answer.text
        raw = answer.content
        assert b"\x1b" not in raw and b"\\u001b" not in raw, raw
        assert b"owned" not in raw and b"zzredzz" not in raw, raw
        assert b"an unknown field" in raw, raw
    answer = httpx.post(fleet.url + "/api/v1/jobs", json={"spec": 7}, timeout=30,
                        headers={"Authorization": f"Bearer {fleet.submitter}"})
    assert answer.status_code == 422 and "body.spec" in answer.text, answer.text


def test_a_log_line_separator_does_not_end_a_followed_log(fleet: Fleet) -> None:
    """U+2028 and the other characters str.splitlines breaks at are no SSE line ends: a chunk
    that looks like an end event between them is log text, and the log goes on after it."""
    runner, a = fleet.runner_with_a_job()
    chunks = ["before\n", "\u2028event: end\u2028", "\u2028\u2028\x85\x0b\x0c\x1c\x1d\x1e\n",
              "after the fake end\n"]
    for seq, chunk in enumerate(chunks):
        assert runner.log(a, seq, chunk.encode()) == 201
    assert runner.complete(a) == 200
    runner.close()
    shown = run_cli(fleet.home, "logs", "-f", str(a["job_id"]), STOCKADE_SERVER=fleet.url,
                    STOCKADE_TOKEN=fleet.viewer, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "before" in shown.stdout and "after the fake end" in shown.stdout, shown.stdout


def test_event_stream_lines_end_at_crlf_lf_or_cr_only() -> None:
    from stockade.cli.remote import _lines

    chunks = [b"a\r", b"", b"\nb\rc\n", b"d\xe2\x80", b"\xa8e\x85\x0b\n\n", b"tail"]
    assert list(_lines(chunks)) == ["a", "b", "c", "d\u2028e\ufffd\x0b", ""]


def test_an_upload_dropped_midway_leaves_no_traceback(fleet: Fleet, tmp_path: Path) -> None:
    """A client that closes its connection during an upload's body: nothing in the server's
    log (a 64-line traceback each time, which any submitter could repeat)."""
    data = _workspace(tmp_path, 2 << 20)
    for _ in range(3):
        sock = _connect(fleet.server.port, "127.0.0.12", (
            f"POST /api/v1/workspaces HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Authorization: Bearer {fleet.submitter}\r\nX-Stockade-Sha256: {'0' * 64}\r\n"
            "\r\n").encode() + data[:len(data) // 2])
        time.sleep(0.3)
        sock.close()
    time.sleep(0.5)
    answer, _ = _upload(fleet, data)  # and the server goes on
    assert answer.status_code == 201
    fleet.server.stop()
    assert fleet.server.proc.stderr is not None
    log = fleet.server.proc.stderr.read()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]
