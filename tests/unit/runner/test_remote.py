"""The runner agent's requests to the server (runner/remote.py): which answers it sends the
request again for, and which it takes as a refusal; against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.runner.attest import Identity
from stockade.runner.remote import Refused, Session


class _Server(http.server.ThreadingHTTPServer):
    answers: list[int]  # the status of each request, in turn (then 200)
    seen: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(self.headers.get("Authorization", ""))
        status = self.server.answers.pop(0) if self.server.answers else 200
        body = b'{"detail": "no"}' if status >= 400 else b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 408:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    made = _Server(("127.0.0.1", 0), _Handler)
    made.answers, made.seen = [], []
    thread = threading.Thread(target=made.serve_forever, daemon=True)
    thread.start()
    yield made
    made.shutdown()
    made.server_close()


def _session(server: _Server, tmp_path: Path) -> Session:
    session = Session(f"http://127.0.0.1:{server.server_address[1]}", Identity(tmp_path),
                      lambda: {})
    session.token = "stks_a_b"
    return session


def test_a_request_whose_body_came_too_slowly_is_sent_again(server: _Server,
                                                             tmp_path: Path) -> None:
    """408 (the body did not arrive in time, a slow link) and 5xx: sent again."""
    server.answers = [408, 503, 408]
    answer = _session(server, tmp_path).call("POST", "/api/v1/runner/claim", json={})
    assert answer.json() == {"ok": True}
    assert server.seen == ["Bearer stks_a_b"] * 4


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
def test_other_refusals_are_not_sent_again(server: _Server, tmp_path: Path, status: int) -> None:
    server.answers = [status]
    with pytest.raises(Refused) as refused:
        _session(server, tmp_path).call("POST", "/api/v1/runner/claim", json={})
    assert refused.value.status == status and refused.value.detail == "no"
    assert len(server.seen) == 1
