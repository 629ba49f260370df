"""A small HTTP service on a loopback address of this host (an operator's internal one, as
jobs reach it through the egress proxy)."""

from __future__ import annotations

import http.server
import threading

BODY = b"internal service says hi\n"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


class InternalService:
    """Answers every GET with :data:`BODY`; ``port`` is where it listens."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.server = http.server.ThreadingHTTPServer((address, 0), _Hello)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
