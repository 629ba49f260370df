"""The proxy itself over real sockets (loopback only): one request per plain-HTTP connection,
queuing for a slot instead of 503, and records that name only cleaned hosts.

The upstream is a raw recorder on 127.0.0.1 that the operator opened (an internal entry); it
keeps reading after the first request, so anything the proxy forwarded would show up."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stockade.api.protocol import EgressRecord
from stockade.egress.policy import Policy
from stockade.egress.proxy import JobProxy, Limits
from stockade.egress.resolver import HostsFileResolver


class Upstream:
    """Answers each connection's first request head with a small 200 after ``delay`` seconds
    and records every byte that arrives on it within ``linger`` seconds."""

    def __init__(self, delay: float = 0.0, linger: float = 0.3) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.delay, self.linger = delay, linger
        self.received: list[bytes] = []
        self.active = self.peak = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        data = b""
        conn.settimeout(10)
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            time.sleep(self.delay)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.settimeout(self.linger)
            while chunk := conn.recv(65536):
                data += chunk
        except OSError:
            pass
        finally:
            with self._lock:
                self.active -= 1
                self.received.append(data)
            conn.close()

    def close(self) -> None:
        self.sock.close()


class Proxy:
    def __init__(self, root: Path, upstream: Upstream, limits: Limits, clean=None) -> None:
        self.path = str(root / "egress.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(self.path)
        listener.listen(512)
        hosts = root / "hosts"
        hosts.write_text("127.0.0.1 up.example.test\n")
        policy = Policy.from_spec("block", (f"up.example.test:{upstream.port}",),
                                  internal=(f"127.0.0.1/32:{upstream.port}",))
        self.records: list[EgressRecord] = []
        extra = {"clean": clean} if clean else {}
        self.proxy = JobProxy(policy, HostsFileResolver(hosts), listener, self.records.append,
                              limits, **extra)
        self.proxy.start()

    def talk(self, data: bytes, timeout: float = 10) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.path)  # blocking: waits while the listen backlog is full
            s.settimeout(timeout)
            s.sendall(data)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except OSError as e:
                out += f"[{e}]".encode()
            return out


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@pytest.fixture
def proxy(tmp_path: Path, upstream: Upstream) -> Iterator[Proxy]:
    p = Proxy(tmp_path, upstream, Limits(header_timeout_s=2))
    yield p
    p.proxy.stop()


def test_a_fronted_host_and_a_pipelined_request_never_reach_upstream(
        proxy: Proxy, upstream: Upstream) -> None:
    port = upstream.port
    first = (f"GET http://up.example.test:{port}/one HTTP/1.1\r\nHost: evil.example\r\n"
             "\r\n").encode()
    second = b"GET /two HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    answer = proxy.talk(first + second)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    time.sleep(upstream.linger + 0.2)
    [seen] = upstream.received
    assert seen.startswith(b"GET /one HTTP/1.1\r\n")
    assert f"\r\nHost: up.example.test:{port}\r\n".encode() in seen
    assert b"evil" not in seen and b"/two" not in seen


def test_exactly_the_declared_body_is_forwarded(proxy: Proxy, upstream: Upstream) -> None:
    head = (f"POST http://up.example.test:{upstream.port}/up HTTP/1.1\r\n"
            "Content-Length: 5\r\n\r\n").encode()
    assert proxy.talk(head + b"hello" + b"GET /smuggled HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 200")
    time.sleep(upstream.linger + 0.2)
    [seen] = upstream.received
    assert seen.endswith(b"\r\n\r\nhello")
    assert proxy.records[0].bytes_up == 5


def test_a_body_that_arrives_later_is_still_delimited(proxy: Proxy, upstream: Upstream
                                                      ) -> None:
    head = (f"PUT http://up.example.test:{upstream.port}/up HTTP/1.1\r\n"
            "Content-Length: 70000\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(proxy.path)
        s.sendall(head)
        time.sleep(0.1)
        s.sendall(b"x" * 70000 + b"GET /smuggled HTTP/1.1\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    time.sleep(upstream.linger + 0.2)
    [seen] = upstream.received
    assert seen.endswith(b"\r\n\r\n" + b"x" * 70000)


@pytest.mark.parametrize("headers, status", [
    (b"Transfer-Encoding: chunked\r\n", b"411"),
    (b"Host: a\r\nHost: b\r\n", b"400"),
])
def test_ambiguous_requests_are_refused_before_upstream(proxy: Proxy, upstream: Upstream,
                                                        headers: bytes, status: bytes) -> None:
    head = f"POST http://up.example.test:{upstream.port}/ HTTP/1.1\r\n".encode()
    answer = proxy.talk(head + headers + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert upstream.received == []


def test_connections_beyond_the_limit_wait_for_a_slot(tmp_path: Path) -> None:
    slow = Upstream(delay=0.1, linger=0.05)
    p = Proxy(tmp_path, slow, Limits(max_connections=8, header_timeout_s=10, max_waiting=100))
    request = f"GET http://up.example.test:{slow.port}/ HTTP/1.1\r\n\r\n".encode()
    try:
        with ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(lambda _: p.talk(request, timeout=30), range(100)))
    finally:
        p.proxy.stop()
        slow.close()
    assert [a[:12] for a in answers] == [b"HTTP/1.1 200"] * 100
    assert slow.peak <= 8


def test_only_connections_finding_no_slot_in_time_get_503_the_rest_wait_unaccepted(
        tmp_path: Path) -> None:
    slow = Upstream(delay=1.5, linger=0.05)
    p = Proxy(tmp_path, slow, Limits(max_connections=1, header_timeout_s=0.5, max_waiting=1))
    request = f"GET http://up.example.test:{slow.port}/ HTTP/1.1\r\n\r\n".encode()
    try:
        with ThreadPoolExecutor(3) as pool:
            holder = pool.submit(p.talk, request)
            time.sleep(0.2)
            waiter = pool.submit(p.talk, request)
            time.sleep(0.1)
            started = time.monotonic()
            # the one waiting place is taken: not accepted (the kernel's backlog holds it, no
            # descriptor of the runner's) until the waiter gives up, then it waits its turn
            extra = p.talk(request)
            assert extra.startswith(b"HTTP/1.1 503") and time.monotonic() - started > 0.6
            assert waiter.result().startswith(b"HTTP/1.1 503")  # waited 0.5 s, no slot came
            assert holder.result().startswith(b"HTTP/1.1 200")
    finally:
        p.proxy.stop()
        slow.close()


def test_records_name_hosts_only_through_clean(tmp_path: Path, upstream: Upstream) -> None:
    secret = "SeCrEtToKeN42"

    def clean(text: str) -> str:
        return text.replace(secret, "***")

    p = Proxy(tmp_path, upstream, Limits(), clean=clean)
    try:
        answers = [p.talk(f"CONNECT {secret}.x.test:443 HTTP/1.1\r\n\r\n".encode()),
                   p.talk(f"GET http://{secret}.x.test/ HTTP/1.1\r\n\r\n".encode())]
    finally:
        p.proxy.stop()
    for answer in answers:  # what the job reads back (and may print) is cleaned too
        assert answer.startswith(b"HTTP/1.1 403") and b"***.x.test" in answer
        assert secret.lower().encode() not in answer.lower()
    assert [r.host for r in p.records] == ["***.x.test", "***.x.test"]
    for r in p.records:
        assert secret.lower() not in (r.reason + r.destination).lower()
        assert r.reason == f"***.x.test:{r.port} is not in the allowlist"
