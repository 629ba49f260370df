"""``stockade server``: the HTTP API over the embedded control plane."""

from __future__ import annotations

import argparse
import sys

HELP = "serve the HTTP API (jobs, health) on a loopback address by default"
DESCRIPTION = """\
stockade server [--listen HOST:PORT]

Serves the versioned HTTP API (/api/v1, OpenAPI at /openapi.json) and /healthz, /readyz, over
this installation's state directory. Requests need an API token (stockade token create).
Listens on 127.0.0.1:8377 by default; a port of 0 picks a free one. The address it listens on
is printed on stderr once it accepts connections. SIGINT or SIGTERM stops it gracefully (the
process then ends by that signal).

Not yet: runner agents, so submitted jobs wait queued; TLS; PostgreSQL (see issue 9)."""


MAX_CONNECTIONS = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--listen HOST:PORT]``."""
    p.add_argument("--listen", default="127.0.0.1:8377", metavar="HOST:PORT",
                   help="the address to listen on (default 127.0.0.1:8377)")


def main(args: argparse.Namespace) -> int:
    """Serve until stopped."""
    import socket

    import uvicorn

    from stockade.api.server import create_app
    from stockade.cli.context import fleet_service, open_control
    from stockade.errors import UsageError

    host, sep, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {args.listen[:80]!r} is not HOST:PORT",
                         hint="e.g. --listen 127.0.0.1:8377")
    settings, control = open_control()
    fleet = fleet_service(settings, control)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {args.listen}: {e.strerror}",
                         hint="pick another --listen address") from e
    sock.listen(128)
    bound = sock.getsockname()
    where = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    # bounded: at most MAX_CONNECTIONS at once (more get 503), idle ones closed after 5 s
    config = uvicorn.Config(create_app(settings, control, fleet), log_level="warning",
                            access_log=False, server_header=False,
                            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    sys.stderr.write(f"stockade server listening on http://{where}:{bound[1]}\n")
    sys.stderr.flush()
    server.run(sockets=[sock])
    return 0
