"""The per-job egress proxy: asyncio, one Unix socket per job, every decision recorded.

A job can only reach the socket bind-mounted into its own sandbox, so the socket a connection
arrives on is the job it belongs to: no header or address a job sends can claim another job's
rules. The proxy checks the name, resolves it itself, checks every resolved address, and
connects to exactly the address it checked. A plain-HTTP connection carries exactly one
request (:mod:`.http`): its body is forwarded up to its ``Content-Length`` and the client is
never read again, so a pipelined second request never reaches the upstream unchecked.

At most ``max_connections`` connections are served at once; more wait (up to the header
timeout) for a slot, and only those that still find none, or arrive while ``max_waiting``
already wait, get 503. Every host a record names passes through ``clean`` first (secrets
masked, control characters escaped): the job chose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from stockade.api.protocol import EgressRecord
from stockade.egress import http
from stockade.egress.local import host_addresses
from stockade.egress.policy import (
    IPAddress,
    Policy,
    Screen,
    is_ip,
    screen_address,
    screen_name,
)
from stockade.egress.relay import Tunnel
from stockade.egress.resolver import ResolveError, Resolver

STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
               408: "Request Timeout", 411: "Length Required",
               431: "Request Header Fields Too Large",
               502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class Limits(NamedTuple):
    """Per-job bounds of the proxy."""

    max_connections: int = 64
    header_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_waiting: int = 0  # connections waiting for a slot; 0: four times max_connections
    # new connections accepted per second on average (and at most this many more at once):
    # the proxy runs in the runner, outside the job's cgroup, so a job that only connects and
    # disconnects must not make the runner spend its CPU; beyond, connections wait in the
    # kernel's backlog (in the job's own network namespace) until accepted
    accept_rate: float = 150.0
    accept_burst: int = 300

    @property
    def waiting(self) -> int:
        """How many connections may wait for a slot at once."""
        return self.max_waiting or 4 * self.max_connections


DEFAULT_LIMITS = Limits()


def _same(text: str) -> str:
    return text


class _Pace:
    """A token bucket: on average ``rate`` takes per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = max(rate, 0.001), max(burst, 1)
        self.tokens, self.at = float(self.burst), time.monotonic()

    async def take(self) -> None:
        """Wait until a token is there, and take it."""
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class JobProxy:
    """The proxy of one job, serving its listening socket from a thread of its own."""

    def __init__(self, policy: Policy, resolver: Resolver, listener: socket.socket,
                 on_decision: Callable[[EgressRecord], None], limits: Limits = DEFAULT_LIMITS,
                 clean: Callable[[str], str] = _same) -> None:
        self.policy = policy
        self.clean = clean
        self.resolver = resolver
        self.listener = listener
        self.on_decision = on_decision
        self.limits = limits
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="egress-proxy")
        self._pool = ThreadPoolExecutor(max_workers=2 * limits.max_connections,
                                        thread_name_prefix="egress-relay")
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tunnels: set[Tunnel] = set()
        self._slots = asyncio.Semaphore(limits.max_connections)
        self._waiting = 0

    def start(self) -> None:
        """Start accepting connections on the job's socket."""
        self.listener.setblocking(False)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._accepting = asyncio.ensure_future(self._accept())

    def stop(self) -> None:
        """Stop accepting, end every connection and tunnel, join the threads."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for tunnel in list(self._tunnels):
            tunnel.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self) -> None:
        """Accept while there is room: at most the served and waiting connections at once
        (each one a descriptor of the runner's), at the pace of ``accept_rate``."""
        loop = asyncio.get_running_loop()
        room = asyncio.Semaphore(self.limits.max_connections + self.limits.waiting)
        pace = _Pace(self.limits.accept_rate, self.limits.accept_burst)
        while True:
            await room.acquire()
            await pace.take()
            try:
                client, _ = await loop.sock_accept(self.listener)
            except OSError:
                room.release()
                await asyncio.sleep(0.05)  # e.g. EMFILE: back off rather than spin
                continue
            task = asyncio.ensure_future(self._serve(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: room.release())

    async def _serve(self, client: socket.socket) -> None:
        try:
            if not await self._slot():
                return await self._refuse(client, 503, "too many connections")
            try:
                await self._handle(client)
            finally:
                self._slots.release()
        except (OSError, asyncio.CancelledError):
            pass
        except Exception:  # one connection's surprise must never take the job's proxy down
            pass
        finally:
            client.close()

    async def _slot(self) -> bool:
        """Take a connection slot, waiting up to the header timeout (False: none came)."""
        if self._waiting >= self.limits.waiting:
            return False
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.header_timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def _handle(self, client: socket.socket) -> None:
        try:
            head, rest = await asyncio.wait_for(self._read_head(client),
                                                self.limits.header_timeout_s)
            request = http.parse(head)
        except TimeoutError:
            return await self._refuse(client, 408, "request head not received in time")
        except http.BadRequest as e:
            return await self._refuse(client, e.status, e.message)
        started, at = time.monotonic(), time.time()
        screen, targets = await self._screen(request)
        if not screen.allowed or not targets:  # the job reads (and may print) the cleaned text
            # a refused internal address is recorded: the operator sees what would open it
            record = self._record(request, screen.operator_only, screen, 0, 0, started, at)
            return await self._refuse(client, 403, f"stockade egress policy: {record.reason}")
        connected = await self._connect(targets, request.port)
        if connected is None:
            self._record(request, str(targets[0]), Screen(True, "connect failed",
                                                          screen.audit_only), 0, 0, started, at)
            return await self._refuse(client, 502, "could not connect to the destination")
        address, upstream = connected
        with upstream:
            sent, received = await self._tunnel(client, upstream, request, rest)
        self._record(request, address, screen, sent, received, started, at)

    async def _read_head(self, client: socket.socket) -> tuple[bytes, bytes]:
        """The request head, and whatever the client already sent after it."""
        loop = asyncio.get_running_loop()
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > http.MAX_HEAD:
                raise http.BadRequest(431, "request head too large")
            chunk = await loop.sock_recv(client, 65536)
            if not chunk:
                raise http.BadRequest(400, "connection closed before the request head ended")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n", rest

    async def _tunnel(self, client: socket.socket, upstream: socket.socket,
                      request: http.Request, rest: bytes) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        limit: int | None = None  # CONNECT: whatever the client sends, until it is done
        if request.is_tunnel:
            await loop.sock_sendall(client, b"HTTP/1.1 200 Connection established\r\n"
                                            b"Proxy-Agent: stockade\r\n\r\n")
        else:  # one request: its body and nothing after it (a pipelined request is dropped)
            rest = rest[:request.content_length]
            limit = request.content_length - len(rest)
            await loop.sock_sendall(upstream, request.origin_head())
        if rest:
            await loop.sock_sendall(upstream, rest)
        tunnel = Tunnel(client, upstream, self.limits.idle_timeout_s)
        self._tunnels.add(tunnel)
        pumps = [loop.run_in_executor(self._pool, tunnel.down)]
        if limit != 0:
            pumps.append(loop.run_in_executor(self._pool, tunnel.up, limit))
        try:
            await asyncio.gather(*pumps)
        finally:
            tunnel.close()
            self._tunnels.discard(tunnel)
        return tunnel.sent + len(rest), tunnel.received

    async def _screen(self, request: http.Request) -> tuple[Screen, list[IPAddress]]:
        """Decide on the name, then on every resolved address; return the usable ones."""
        if is_ip(request.host):
            address = ipaddress.ip_address(request.host)
            verdict = screen_address(self.policy, address, request.port, literal=True,
                                     host=host_addresses())
            return verdict, [address] if verdict.allowed else []
        verdict = screen_name(self.policy, request.host, request.port)
        if not verdict.allowed:
            return verdict, []
        try:
            addresses = await asyncio.wait_for(
                self.resolver.resolve(request.host, request.port), self.limits.connect_timeout_s)
        except ResolveError as e:
            return Screen(False, str(e)), []
        except TimeoutError:
            return Screen(False, f"resolving {request.host} timed out"), []
        usable, last = [], verdict
        for address in addresses:
            check = screen_address(self.policy, address, request.port, literal=False,
                                   host=host_addresses())
            if check.allowed:
                usable.append(address)
            else:
                last = check._replace(reason=f"{request.host} resolves to {address}: "
                                             f"{check.reason}")
        return (verdict if usable else last), usable

    async def _connect(self, targets: list[IPAddress], port: int
                       ) -> tuple[str, socket.socket] | None:
        """Connect to the first reachable checked address (never resolving again)."""
        loop = asyncio.get_running_loop()
        for address in targets:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (str(address), port)),
                                       self.limits.connect_timeout_s)
                return str(address), sock
            except (OSError, TimeoutError):
                sock.close()
        return None

    async def _refuse(self, client: socket.socket, status: int, message: str) -> None:
        data = http.response(status, STATUS_TEXT.get(status, "Error"), message + "\n")
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(client, data), 5)

    def _record(self, request: http.Request, address: str | None, screen: Screen,
                sent: int, received: int, started: float, at: float) -> EgressRecord:
        host = self._shown(request)
        reason = screen.reason.replace(request.host, host) if host != request.host \
            else screen.reason
        record = EgressRecord(
            host=host, port=request.port, address=address, allowed=screen.allowed,
            reason=self.clean(reason), audit_only=screen.audit_only, bytes_up=sent,
            bytes_down=received, duration_s=time.monotonic() - started, at=at)
        self.on_decision(record)
        return record

    def _shown(self, request: http.Request) -> str:
        """The host as a record may name it: through ``clean``, looked at both as the client
        spelled it (a secret keeps its case there) and as the proxy normalised it."""
        for candidate in (request.written_host.rstrip("."), request.host):
            cleaned = self.clean(candidate)
            if cleaned != candidate:
                return cleaned.lower()
        return request.host
