"""The per-job egress proxy: asyncio, one Unix socket per job, every decision recorded.

A job can only reach the socket bind-mounted into its own sandbox, so the socket a connection
arrives on is the job it belongs to: no header or address a job sends can claim another job's
rules. The proxy checks the name, resolves it itself, checks every resolved address, and
connects to exactly the address it checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from stockade.api.protocol import EgressRecord
from stockade.egress import http
from stockade.egress.policy import IPAddress, Policy, Screen, screen_address, screen_name
from stockade.egress.resolver import ResolveError, Resolver

STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
               408: "Request Timeout", 431: "Request Header Fields Too Large",
               502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class Limits:
    """Per-job bounds of the proxy."""

    max_connections: int = 64
    header_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    buffer_bytes: int = 256 * 1024


class JobProxy:
    """The proxy of one job, serving its Unix socket from a thread of its own."""

    def __init__(self, policy: Policy, resolver: Resolver, listener: socket.socket,
                 on_decision: Callable[[EgressRecord], None], limits: Limits = Limits()) -> None:
        self.policy = policy
        self.resolver = resolver
        self.listener = listener
        self.on_decision = on_decision
        self.limits = limits
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="egress-proxy")
        self._server: asyncio.base_events.Server | None = None
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Serve the job's listening socket from the proxy's own thread."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self.listener, limit=http.MAX_HEAD)

    def stop(self) -> None:
        """Close the socket and every connection; join the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._active += 1
        try:
            if self._active > self.limits.max_connections:
                writer.write(http.response(503, STATUS_TEXT[503], "too many connections\n"))
            else:
                await self._handle(reader, writer)
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            self._active -= 1
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(http.read_head(reader), self.limits.header_timeout_s)
            request = http.parse(head)
        except TimeoutError:
            return await self._refuse(writer, 408, "request head not received in time")
        except http.BadRequest as e:
            return await self._refuse(writer, e.status, e.message)
        started, at = time.monotonic(), time.time()
        screen, targets = await self._screen(request)
        if not screen.allowed or not targets:
            self._record(request, None, screen, 0, 0, started, at)
            return await self._refuse(writer, 403, f"stockade egress policy: {screen.reason}")
        upstream = await self._connect(targets, request.port)
        if upstream is None:
            self._record(request, str(targets[0]), Screen(True, "connect failed",
                                                          screen.audit_only), 0, 0, started, at)
            return await self._refuse(writer, 502, "could not connect to the destination")
        address, up_reader, up_writer = upstream
        if request.is_tunnel:
            writer.write(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: stockade\r\n\r\n")
        else:
            up_writer.write(request.origin_head())
        sent, received = await self._pipe(reader, writer, up_reader, up_writer)
        self._record(request, address, screen, sent, received, started, at)

    async def _screen(self, request: http.Request) -> tuple[Screen, list[IPAddress]]:
        """Decide on the name, then on every resolved address; return the usable ones."""
        import ipaddress

        if http.is_ip(request.host):
            address = ipaddress.ip_address(request.host)
            verdict = screen_address(self.policy, address, request.port, literal=True)
            return verdict, [address] if verdict.allowed else []
        verdict = screen_name(self.policy, request.host, request.port)
        if not verdict.allowed:
            return verdict, []
        try:
            addresses = await self.resolver.resolve(request.host, request.port)
        except ResolveError as e:
            return Screen(False, str(e)), []
        usable, last = [], verdict
        for address in addresses:
            check = screen_address(self.policy, address, request.port, literal=False)
            if check.allowed:
                usable.append(address)
            else:
                last = Screen(False, f"{request.host} resolves to {check.reason}")
        return (verdict if usable else last), usable

    async def _connect(self, targets: list[IPAddress], port: int
                       ) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the first reachable checked address (never resolving again)."""
        for address in targets:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=self.limits.buffer_bytes),
                    self.limits.connect_timeout_s)
                return str(address), r, w
            except (OSError, TimeoutError):
                continue
        return None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
                    ) -> tuple[int, int]:
        """Copy both ways until either side closes or the tunnel is idle too long."""
        counts = [0, 0]
        last = [time.monotonic()]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, i: int) -> None:
            try:
                while data := await src.read(self.limits.buffer_bytes):
                    counts[i] += len(data)
                    last[0] = time.monotonic()
                    dst.write(data)
                    await dst.drain()
            finally:
                with contextlib.suppress(Exception):
                    if dst.can_write_eof():
                        dst.write_eof()  # pass the half-close on

        upstream = asyncio.ensure_future(copy(reader, up_writer, 0))
        downstream = asyncio.ensure_future(copy(up_reader, writer, 1))
        try:  # over when the destination is done sending, or idle for too long
            while not downstream.done():
                await asyncio.wait([downstream], timeout=min(5.0, self.limits.idle_timeout_s))
                if time.monotonic() - last[0] > self.limits.idle_timeout_s:
                    break
        finally:
            for task in (upstream, downstream):
                task.cancel()
            await asyncio.gather(upstream, downstream, return_exceptions=True)
            with contextlib.suppress(Exception):
                up_writer.close()
        return counts[0], counts[1]

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        writer.write(http.response(status, STATUS_TEXT.get(status, "Error"), message + "\n"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 5)

    def _record(self, request: http.Request, address: str | None, screen: Screen,
                sent: int, received: int, started: float, at: float) -> None:
        self.on_decision(EgressRecord(
            host=request.host, port=request.port, address=address, allowed=screen.allowed,
            reason=screen.reason, audit_only=screen.audit_only, bytes_up=sent,
            bytes_down=received, duration_s=time.monotonic() - started, at=at))
