"""A tiny HTTP(S) server for egress tests: answers who it is, counts nothing, trusts nothing.

Usage: python web_server.py ADDRESS:PORT [ADDRESS:PORT ...] [--tls CERT KEY] [--ready FILE]
Every response body is ``hello from ADDRESS:PORT path=PATH host=HOST``. ``/big/N`` streams N
bytes. Meant to run inside a test network namespace (see ``internet.py``).
"""

from __future__ import annotations

import argparse
import http.server
import socket
import ssl
import threading
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/big/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 262144
            while size > 0:
                n = min(size, len(chunk))
                self.wfile.write(chunk[:n])
                size -= n
            return
        addr, port = self.server.server_address[:2]
        body = f"hello from {addr}:{port} path={self.path} host={self.headers.get('Host')}\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve(bind: str, tls: ssl.SSLContext | None) -> Server:
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = Server((host, int(port)), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("binds", nargs="+")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--ready")
    args = parser.parse_args()
    tls = None
    if args.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(*args.tls)
    for bind in args.binds:
        serve(bind, tls if bind.endswith(":443") else None)
    if args.ready:
        Path(args.ready).write_text("ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
