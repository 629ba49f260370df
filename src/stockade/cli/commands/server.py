"""``stockade server``: the HTTP API over the embedded control plane (its connections are
bounded as :mod:`stockade.api.connections` says)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

GRACE_S = 5  # seconds requests under way get to finish once the server is told to stop
HELP = "serve the HTTP API (jobs, runners, admin) on a loopback address by default"
DESCRIPTION = """\
stockade server [--listen HOST:PORT] [--database-url URL] [--tls-cert PEM --tls-key PEM]

Serves the versioned HTTP API (/api/v1, OpenAPI at /openapi.json) and /healthz, /readyz, over
this installation's state directory: jobs, workspaces, logs (live as server-sent events),
artifacts, cancel; runners, enrolment tokens, the audit trail and secrets for admins; and the
routes of runner agents (stockade runner start, docs/fleet.md). Requests need an API token
(stockade token create); runner agents enrol with a token from stockade runner enrol-token.
Listens on 127.0.0.1:8377 by default; a port of 0 picks a free one. The address it listens on
is printed on stderr once it accepts connections. SIGINT or SIGTERM stops it gracefully:
runners' long polls are answered at once (no job), requests under way get 5 s to finish (live
log streams are cut then), and the process ends by that signal.

--database-url (or STOCKADE_DATABASE_URL) puts the state on PostgreSQL
(postgresql://user:password@host/db); any number of servers on one database serve the same
jobs, runners and logs (replicas). --tls-cert and --tls-key serve HTTPS: use them (or a
TLS-terminating proxy) whenever clients or runners are on other hosts. GET /metrics (a
viewer's token) has Prometheus metrics. stockade up starts a server and runners on this host
in one command; docs/fleet.md describes the protocol.

Connections are bounded: a request's head must arrive within 10 s, one client address holds
at most 64 connections (all clients 1024; a new one beyond replaces the one idle longest),
and at most 256 requests are served at once (more get 503 with Retry-After)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--listen HOST:PORT]``."""
    p.add_argument("--listen", default="127.0.0.1:8377", metavar="HOST:PORT",
                   help="the address to listen on (default 127.0.0.1:8377)")
    p.add_argument("--database-url", metavar="URL", default=None,
                   help="PostgreSQL to keep the state in (default: STOCKADE_DATABASE_URL, "
                   "else the embedded SQLite file)")
    p.add_argument("--tls-cert", metavar="PEM", default=None,
                   help="serve HTTPS with this certificate (chain) file")
    p.add_argument("--tls-key", metavar="PEM", default=None,
                   help="... and this private key file")


def main(args: argparse.Namespace) -> int:
    """Serve until stopped."""
    import os
    import socket

    import uvicorn

    from stockade.api.connections import (
        BACKLOG,
        KEEP_ALIVE_S,
        MAX_REQUESTS,
        Busy,
        connection_room,
        guarded_protocol,
    )
    from stockade.api.server import create_app
    from stockade.cli.context import fleet_service, open_control
    from stockade.errors import UsageError
    from stockade.text import digits

    host, sep, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not digits(port) or int(port) > 65535:
        raise UsageError(f"--listen {args.listen[:80]!r} is not HOST:PORT",
                         hint="e.g. --listen 127.0.0.1:8377")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together",
                         hint="pass both, or neither for plain HTTP on loopback")
    for pem in (args.tls_cert, args.tls_key):
        if pem and not os.access(pem, os.R_OK):
            raise UsageError(f"cannot read {pem}", hint="pass a readable PEM file")
    if args.database_url:
        os.environ["STOCKADE_DATABASE_URL"] = args.database_url
    settings, control = open_control()
    fleet = fleet_service(settings, control)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so: TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {args.listen}: {e.strerror}",
                         hint="pick another --listen address") from e
    sock.listen(BACKLOG)
    bound = sock.getsockname()
    where = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    # bounded as the module docstring says; idle keep-alive connections closed after 5 s
    app = create_app(settings, control, fleet)
    waker = app.ctx.waker

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            waker.close()  # long polls answer now: shutting down waits for no poll's end
            super().handle_exit(sig, frame)

    config = uvicorn.Config(Busy(app, MAX_REQUESTS),
                            http=guarded_protocol(connection_room()), loop="uvloop",
                            ws="none",  # (an upgrade would leave the protocol's bounds)
                            log_level="error",  # (a warning per odd request: log spam)
                            access_log=False, server_header=False, limit_concurrency=None,
                            timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=GRACE_S,
                            ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    try:
        config.load()  # the TLS files: a bad one is the user's mistake, said plainly
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot use --tls-cert/--tls-key: {e}",
                         hint="pass a PEM certificate and its unencrypted private key") from e
    server = Server(config)
    scheme = "https" if args.tls_cert else "http"
    sys.stderr.write(f"stockade server listening on {scheme}://{where}:{bound[1]}\n")
    sys.stderr.flush()
    server.run(sockets=[sock])
    return 0
