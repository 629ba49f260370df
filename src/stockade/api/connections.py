"""The connections ``stockade server`` takes, bounded so that no client can hold the slots
others need (:func:`guarded_protocol`): a request's head (request line and headers) must
arrive within :data:`HEAD_TIMEOUT_S` of the connection (or of the previous response), however
it trickles, and be at most :data:`MAX_HEAD_BYTES` (431); one client address (an
IPv6 /64) holds at most :data:`PER_CLIENT` connections and all clients :data:`MAX_CONNECTIONS`,
and a new connection beyond either bound takes the place of the one that has waited longest for
its next request head (idle or trickling), or is refused (503) if every one is serving a
request. Requests being served at once are bounded too
(:data:`MAX_REQUESTS`, :class:`Busy`); idle connections do not count against that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
from typing import Any

HEAD_TIMEOUT_S = 10.0  # from a connection (or a response) to the next request's whole head
MAX_HEAD_BYTES = 64 * 1024  # a request line and headers
MAX_HEADERS = 100  # in one request head
MAX_PIPELINED = 4  # requests sent ahead on one connection, queued behind the one served
WRITE_STALL_S = 30.0  # unsent bytes of a response that do not move for this long: dropped
CLOSE_STALL_S = 10.0  # ... once the connection is closing
WATCH_EVERY_S = 2.0  # how often stalled connections are looked for
SEND_BUFFER = 256 * 1024  # unsent bytes the kernel holds for a connection (it doubles this)
PER_CLIENT = 64  # connections of one address (IPv6: one /64) at once
MAX_CONNECTIONS = 1024  # connections of all clients at once (fewer if files are scarce)
MAX_REQUESTS = 256  # requests served at once
KEEP_ALIVE_S = 5  # an idle connection after a response
BACKLOG = 1024  # connections the kernel holds until the server takes them (bursts)
BODY_IN = "stockade.body_in"  # in a request's state: its whole body has come


def _raw(status: bytes, text: bytes, *headers: bytes) -> bytes:
    """A whole response, written before (or instead of) any request's."""
    return b"\r\n".join((b"HTTP/1.1 " + status, b"content-type: text/plain", *headers,
                         b"content-length: %d" % len(text), b"connection: close", b"", text))


_REFUSED = _raw(b"503 Service Unavailable", b"too many connections from here",
                b"retry-after: 1")
_FULL = _raw(b"503 Service Unavailable", b"the server holds as many connections as it can",
             b"retry-after: 1")
_TIMED_OUT = _raw(b"408 Request Timeout", b"the request head did not come in time")
_TOO_LARGE = _raw(b"431 Request Header Fields Too Large", b"the request head is too large")
_LENGTH_REQUIRED = _raw(b"411 Length Required",
                        b"send the body with a Content-Length (no Transfer-Encoding)")
_BAD = _raw(b"400 Bad Request", b"the request is not valid HTTP/1.1")
_VERSION = _raw(b"505 HTTP Version Not Supported", b"only HTTP/1.0 and HTTP/1.1 are served")


def connection_room() -> int:
    """:data:`MAX_CONNECTIONS`, or fewer if this process may not open that many files (its
    soft limit is raised towards the hard one first)."""
    from stockade.rlimits import raise_open_files

    soft = raise_open_files(MAX_CONNECTIONS + 256)  # the database, log files, threads' pipes
    return max(PER_CLIENT, min(MAX_CONNECTIONS, soft - 256))


def client_key(client: tuple[str, int] | None) -> str:
    """The address a connection counts against: the IPv4 address, or the IPv6 /64 (one host
    usually has a whole /64 to pick addresses from)."""
    return _key_of(client[0]) if client else "local"


@functools.lru_cache(maxsize=4096)
def _key_of(host: str) -> str:
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class Busy:
    """ASGI: at most ``limit`` HTTP requests served at once; more get 503 with Retry-After
    (connections waiting for a request do not count, see :func:`guarded_protocol`)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve the request, or refuse it while ``limit`` others are served."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            body = b'{"detail":"the server is busy; try again"}'
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class Room:
    """The connections one server holds, counted per client key, and those that wait for a
    request head, the longest waiting first (every step O(1): a flood of connections must not
    cost the server more per connection as it grows)."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client, self.total, self.count = per_client, total, 0
        self.open: dict[str, int] = {}
        self.waiting: dict[Any, None] = {}  # (dicts keep their order: oldest first)
        self.waiting_of: dict[str, dict[Any, None]] = {}

    def enter(self, key: str) -> list[Any] | None:
        """Count a new connection of ``key``: the waiting ones to close to make room for it,
        or None (not counted) if every one in its way is serving a request."""
        victims = []
        if self.open.get(key, 0) >= self.per_client:
            if not self.waiting_of.get(key):
                return None
            victims.append(next(iter(self.waiting_of[key])))
        if self.count - len(victims) >= self.total:
            other = next((c for c in self.waiting if c not in victims), None)
            if other is None:
                return None
            victims.append(other)
        self.open[key] = self.open.get(key, 0) + 1
        self.count += 1
        return victims

    def mine_full(self, key: str) -> bool:
        """Whether ``key``'s own connections fill its share (else the server's are full)."""
        return self.open.get(key, 0) >= self.per_client

    def leave(self, conn: Any, key: str) -> None:
        """Count a connection of ``key`` out."""
        self.unwait(conn, key)
        self.count -= 1
        self.open[key] -= 1
        if not self.open[key]:
            del self.open[key]

    def wait(self, conn: Any, key: str) -> None:
        """``conn`` waits for a request head from now on."""
        self.unwait(conn, key)
        self.waiting[conn] = None
        self.waiting_of.setdefault(key, {})[conn] = None

    def unwait(self, conn: Any, key: str) -> None:
        """``conn`` waits no more (its head came, or it closed)."""
        self.waiting.pop(conn, None)
        mine = self.waiting_of.get(key)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.waiting_of[key]


def guarded_protocol(max_connections: int = MAX_CONNECTIONS) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the bounds of the module docstring (uvicorn's own
    ``limit_concurrency`` counts idle connections, and it has no deadline on a request head:
    a few hundred silent connections denied every request), and with what its parser and
    uvicorn lack:

    - a request head of at most :data:`MAX_HEAD_BYTES` and :data:`MAX_HEADERS` headers
      (431), counted as the parser reports them and as bytes arrive (llhttp keeps a header's
      pieces until it ends, however long);
    - at most :data:`MAX_PIPELINED` requests queued behind the one being served (more: the
      connection is closed);
    - no ``Transfer-Encoding`` request bodies (411: a chunked body's trailers would be held
      whole, unbounded);
    - an upgrade request (``curl --http2``'s h2c) is served as a plain one, its body
      included (llhttp leaves it unparsed: taken for the next requests, it smuggled them),
      and then the connection closes, whatever else came;
    - a response whose unsent bytes do not move for :data:`WRITE_STALL_S` (the client reads
      nothing), or :data:`CLOSE_STALL_S` once the connection is closing, drops the connection
      (uvicorn waits for the client forever: a few hundred unread responses held every slot;
      a slow download moves), and the kernel holds at most about :data:`SEND_BUFFER` unsent
      bytes of each;
    - a closed connection ends every request it had (the one served and those queued), not
      only the last one parsed.

    With llhttp the event loop spends far less per request than with h11 (the dispatch
    benchmark's event-loop CPU per job: 0.71 to 0.85 ms with h11, 0.41 to 0.56 ms now)."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    room = Room(PER_CLIENT, max_connections)
    live: set[Guarded] = set()
    watching: list[asyncio.TimerHandle] = []

    class Refused(Exception):
        """Stops the parser: ``answer`` (if any) is written and the connection closed."""

        def __init__(self, answer: bytes) -> None:
            self.answer = answer

    def watch(loop: asyncio.AbstractEventLoop) -> None:
        """Every :data:`WATCH_EVERY_S`: drop the connections whose writes stalled."""
        now = loop.time()
        for conn in list(live):
            conn.check_stall(now)
        watching[:] = [loop.call_later(WATCH_EVERY_S, watch, loop)]

    class Guarded(HttpToolsProtocol):
        key = ""
        _counted = False  # in ``room``
        _timer: asyncio.TimerHandle | None = None  # set while it waits for a request head
        _heard = False  # bytes of the awaited head came
        _in_head = True  # the parser is before a request's headers' end
        _head = 0  # bytes fed to the parser since it was last in a body (counted at each read)
        _parsed = 0  # bytes of the head being parsed that the parser reported (URL, headers)
        _headers = 0  # headers of the head being parsed
        _upgraded = False  # an upgrade request came: only its body is read after it
        _running: RequestResponseCycle | None = None  # the request being served
        _unsent = 0  # bytes waiting to be sent at the last look
        _progress_at = 0.0  # when the client last took some (or nothing waited)
        _body_left = 0  # bytes of an upgrade request's body still to come

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.key = client_key(self.client)
            victims = room.enter(self.key)
            if victims is None:
                transport.write(_REFUSED if room.mine_full(self.key) else _FULL)
                transport.close()
                return
            self._counted = True
            self._progress_at = self.loop.time()
            live.add(self)
            if not watching:
                watch(self.loop)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            for victim in victims:
                victim.close_waiting()
            self._await_head()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._upgraded:
                self._upgrade_body(data)
                return
            self._unset_keepalive_if_required()
            self._heard = self._heard or self._timer is not None
            if self._in_head:
                self._head += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:  # the parser stops at the upgrade
                self._upgrade_body(data[e.args[0]:])
            except httptools.HttpParserError as e:
                refused = e.__context__
                self._close(refused.answer if isinstance(refused, Refused) else
                            _BAD if self._quiet() else b"")
                return
            if self._in_head and self._head > MAX_HEAD_BYTES:
                self._close(_TOO_LARGE if self._quiet() else b"")

        def on_message_begin(self) -> None:
            self._parsed = self._headers = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url), 0)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value), 1)
            super().on_header(name, value)

        def _count(self, size: int, headers: int) -> None:
            self._parsed += size
            self._headers += headers
            if self._parsed > MAX_HEAD_BYTES or self._headers > MAX_HEADERS:
                raise Refused(_TOO_LARGE if self._quiet() else b"")

        def on_headers_complete(self) -> None:
            self._in_head, self._head = False, 0
            self._stop_waiting()
            if self.parser.get_http_version() not in ("1.0", "1.1"):  # (llhttp takes 0.9-9.9)
                raise Refused(_VERSION if self._quiet() else b"")
            if any(name == b"transfer-encoding" for name, _ in self.headers):
                raise Refused(_LENGTH_REQUIRED if self._quiet() else b"")
            if len(self.pipeline) >= MAX_PIPELINED:
                raise Refused(b"")
            super().on_headers_complete()
            if self.parser.should_upgrade():  # (llhttp parses nothing after its head)
                self._upgraded = True
                self.cycle.keep_alive = False  # closed once answered
                length = [v for k, v in self.headers if k == b"content-length"]
                self._body_left = int(length[0]) if length else 0  # (llhttp checked it)

        def on_message_complete(self) -> None:
            self._in_head = True
            if not self._body_left:  # (an upgrade's body comes after: see _upgrade_body)
                self._body_in()

        def _body_in(self) -> None:
            """The request's whole body has come: the app's next ``receive`` returns it at
            once (its ``state`` says so: :data:`BODY_IN`)."""
            super().on_message_complete()
            if self.cycle is not None:
                self.cycle.scope["state"][BODY_IN] = True

        def _upgrade_body(self, data: bytes) -> None:
            """What came after an upgrade request's head: its body (as llhttp would have
            passed it), then nothing more is read."""
            if self._body_left:
                piece = data[:self._body_left]
                self._body_left -= len(piece)
                if piece:
                    self.on_body(piece)
                if not self._body_left:
                    self._body_in()

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def on_response_complete(self) -> None:
            waits = not self.pipeline  # (a queued request's head has come whole)
            super().on_response_complete()
            if waits and not self.transport.is_closing():
                self._await_head()

        def check_stall(self, now: float) -> None:
            """Drop the connection if what it has to send has not moved for too long (the
            client reads nothing of it: a download read slowly moves)."""
            unsent = self.transport.get_write_buffer_size()
            if not unsent or unsent < self._unsent:
                self._progress_at = now
            self._unsent = unsent
            stalled = now - self._progress_at
            if stalled > (CLOSE_STALL_S if self.transport.is_closing() else WRITE_STALL_S):
                self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self)
            self._stop_waiting()
            self._leave()
            for cycle in (self._running, *(c for c, _ in self.pipeline)):
                if cycle is not None:  # (uvicorn ends only the last one parsed)
                    cycle.disconnected = not cycle.response_complete
                    cycle.message_event.set()
            self.pipeline.clear()
            super().connection_lost(exc)

        def _quiet(self) -> bool:
            """No response is under way (one may be written)."""
            return self.cycle is None or self.cycle.response_complete

        def _close(self, answer: bytes) -> None:
            self._stop_waiting()
            if answer:
                self.transport.write(answer)
            self.transport.close()

        def _await_head(self) -> None:
            self._stop_waiting()
            self._heard = False
            self._timer = self.loop.call_later(HEAD_TIMEOUT_S, self.close_waiting)
            room.wait(self, self.key)

        def _stop_waiting(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                room.unwait(self, self.key)

        def _leave(self) -> None:
            if self._counted:
                self._counted = False
                room.leave(self, self.key)

        def close_waiting(self) -> None:
            """Close this connection, which waits for a request head (408 if part of one
            came and no response is under way)."""
            self._stop_waiting()
            self._leave()
            if not self.transport.is_closing():
                self._close(_TIMED_OUT if self._heard and self._quiet() else b"")

    return Guarded
