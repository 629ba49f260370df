"""Moving a tunnel's bytes: zero-copy ``splice(2)`` through a pipe, one thread per direction.

The proxy decides and connects with asyncio; once a connection is admitted its bytes never
pass through Python: each direction splices socket → pipe → socket in the kernel, so the proxy
keeps up with loopback speeds. A shared clock of the last activity ends tunnels that stay idle
for too long in both directions.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import threading
import time

F_SETPIPE_SZ = 1031
CHUNK = 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024


class Tunnel:
    """Two connected sockets and the byte counts between them."""

    def __init__(self, client: socket.socket, upstream: socket.socket, idle_s: float) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_s = idle_s
        self.sent = 0  # client → upstream
        self.received = 0  # upstream → client
        self._last = time.monotonic()
        self._closed = threading.Event()
        for sock in (client, upstream):
            sock.setblocking(True)
            with contextlib.suppress(OSError):  # bigger socket buffers: fewer wake-ups
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)

    def up(self, limit: int | None = None) -> None:
        """Pump client → upstream until the client is done (then half-close upstream), or
        until ``limit`` bytes have passed (one request's body): then stop reading the client."""
        self.sent += self._pump(self.client, self.upstream, limit)

    def down(self) -> None:
        """Pump upstream → client until the upstream is done; then the tunnel is over."""
        self.received += self._pump(self.upstream, self.client)
        self.close()

    def close(self) -> None:
        """End both directions (wakes up a thread blocked in either of them)."""
        self._closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None = None) -> int:
        total = 0
        done = False
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
            poller = select.poll()
            poller.register(src, select.POLLIN | select.POLLHUP | select.POLLERR)
            while not self._closed.is_set() and not done:
                if not poller.poll(1000):
                    if time.monotonic() - self._last > self.idle_s:
                        self.close()
                    continue
                want = CHUNK if limit is None else min(CHUNK, limit - total)
                n = os.splice(src.fileno(), w, want, flags=os.SPLICE_F_MOVE)
                if n == 0:
                    break
                done = limit is not None and total + n >= limit
                self._last = time.monotonic()
                total += n
                while n:
                    n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
            if not done:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            self.close()
        finally:
            os.close(r)
            os.close(w)
        return total
