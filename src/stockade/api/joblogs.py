"""A job's log (stored, or followed live as server-sent events) and its artifacts.

Logs are the bytes runners stored (already masked and control-escaped by the runner): they are
served as they are, from the database, so a client following a job on any replica sees what
every replica's runners sent. A follower reads the database every :data:`POLL_S`; it holds at
most one page of chunks and one pending write, and a client that stops reading is dropped after
:data:`STALL_S` (see :class:`BoundedStream`). At most :data:`MAX_STREAMS` logs are sent at once
by one server process (a stored log or a live stream); more get 503 with ``Retry-After``, so
that viewers cannot hold every connection the server takes.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import asyncio
import codecs
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Path
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from stockade.api.common import ApiContext, Slots
from stockade.api.jobs import FINISHED, JOB_PATTERN
from stockade.store.interface import JobRow
from stockade.text import digits

PAGE = 4  # chunks read at once (each at most 1 MiB)
POLL_S = 0.2
KEEPALIVE_S = 15.0  # a comment line this often while nothing happens
STALL_S = 60.0  # a client that takes nothing for this long is dropped
STREAM_MAX_S = 3600.0  # then the client reconnects with Last-Event-ID
MAX_STREAMS = 64
STREAMS_PER_TOKEN = 16  # of them for one token
STREAM_RETRY_S = 5
MAX_ARTIFACT_PATH = 4096
_FILE_BLOCK = 1024 * 1024
DOWNLOAD_SLICE = 1024 * 1024  # bytes of an artifact read and sent at a time
MAX_DOWNLOADS = 16  # artifacts sent at once by a server process,
DOWNLOADS_PER_TOKEN = 4  # ... this many to one token


def parse_event_id(value: str | None) -> tuple[int, int] | None:
    """``(attempt, seq)`` of a ``Last-Event-ID`` like ``2.17``; ``(0, -1)`` for none; None if
    malformed: each part 1 to 9 ASCII digits (``isdigit`` takes "²", which ``int`` refuses,
    and a 20-digit number overflowed the database's integers)."""
    if not value:
        return (0, -1)
    attempt, sep, seq = value.partition(".")
    if not sep or not all(len(x) <= 9 and digits(x) for x in (attempt, seq)):
        return None
    return int(attempt), int(seq)


def sse_event(data: str, event_id: str | None = None, event: str | None = None) -> bytes:
    """One server-sent event: each line of ``data`` a ``data:`` field."""
    head = (f"id: {event_id}\n" if event_id else "") + (f"event: {event}\n" if event else "")
    # a CR would end an SSE line: escaped logs hold none, anything else gets it spelled out
    lines = data.replace("\r", "\\r").split("\n")
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


class Truncated(Exception):
    """What a stream sends ends before its end (an artifact pruned during its download)."""


class BoundedStream(Response):
    """A streamed response whose every write must be taken by the client within
    :data:`STALL_S`; a stalled or gone client ends it (the connection is closed). It is sent
    only while it gets one of ``slots`` (503 otherwise; a token at most ``slots.per_key``
    of them: one viewer could hold every stream of a server)."""

    def __init__(self, parts: AsyncGenerator[bytes, None], media_type: str,
                 slots: Slots, headers: dict[str, str] | None = None) -> None:
        # not Response.__init__: that declares the length of an empty body
        self.status_code, self.media_type, self.background = 200, media_type, None
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no",
                           "X-Content-Type-Options": "nosniff", **(headers or {})})
        self.parts, self.slots = parts, slots

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Send the events until they end, the client goes or it stops reading."""
        token = (scope.get("state") or {}).get("token")
        slots = self.slots
        with slots.held(token.id if token is not None else "") as full:
            if full:
                await self.parts.aclose()
                why = f"{slots.limit} {slots.what} are being sent" if full == "all" else \
                    f"this token has {slots.per_key} {slots.what} being sent"
                await JSONResponse({"detail": f"{why}; try again"}, 503,
                                   headers={"Retry-After": str(STREAM_RETRY_S)}
                                   )(scope, receive, send)
                return
            await self._send_all(receive, send)

    async def _send_all(self, receive: Any, send: Any) -> None:
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.create_task(listen())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for chunk in self.parts:
                if gone.is_set():
                    return
                if not chunk:  # a producer's idle tick: only to look whether the client went
                    continue
                await asyncio.wait_for(send({"type": "http.response.body", "body": chunk,
                                             "more_body": True}), STALL_S)
            await asyncio.wait_for(send({"type": "http.response.body", "body": b""}), STALL_S)
        except TimeoutError:
            return  # the server closes the connection of a client that stopped reading
        except Truncated as e:  # (one line in the server's log, the connection closed)
            logging.getLogger("stockade.server").warning("%s", e)
            return
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self.parts.aclose()


async def _in_threads(parts: Iterator[bytes]) -> AsyncGenerator[bytes, None]:
    async for part in iterate_in_threadpool(parts):
        yield part


def add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Add the log and artifact routes to ``app``."""
    control, store, settings = ctx.control, ctx.control.store, ctx.settings
    JobId = Path(pattern=JOB_PATTERN)
    slots = Slots(MAX_STREAMS, STREAMS_PER_TOKEN, "logs")
    downloads = Slots(MAX_DOWNLOADS, DOWNLOADS_PER_TOKEN, "artifacts")

    def job_or_404(job_id: str) -> JobRow:
        job = control.job(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    def stored(job_id: str) -> Iterator[bytes]:
        after, any_chunk = (0, -1), False
        while page := store.log_chunks(job_id, after, PAGE):
            for attempt, seq, data in page:
                any_chunk = True
                yield data
                after = (attempt, seq)
        if not any_chunk:  # a job that ``stockade run`` ran on this host keeps its log here
            path = settings.logs_dir / f"{job_id}.log"
            with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
                while block := f.read(_FILE_BLOCK):
                    yield block

    @app.get("/api/v1/jobs/{job_id}/log", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def log(job_id: str = JobId) -> BoundedStream:
        job_or_404(job_id)
        return BoundedStream(_in_threads(stored(job_id)), "text/plain; charset=utf-8",
                             slots)

    @app.get("/api/v1/jobs/{job_id}/log/stream", response_class=Response,
             responses={200: {"content": {"text/event-stream": {}}}})
    def stream(job_id: str = JobId, last_event_id: str | None = Header(
            None, alias="Last-Event-ID", max_length=24)) -> BoundedStream:
        job_or_404(job_id)
        after = parse_event_id(last_event_id)
        if after is None:
            raise HTTPException(400, "Last-Event-ID is not <attempt>.<seq>")
        return BoundedStream(follow(job_id, after), "text/event-stream", slots)

    async def follow(job_id: str, after: tuple[int, int]) -> AsyncGenerator[bytes, None]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        started = quiet = time.monotonic()
        while time.monotonic() - started < STREAM_MAX_S:
            job = await run_in_threadpool(control.job, job_id)  # before the chunks: see below
            page = await run_in_threadpool(store.log_chunks, job_id, after, PAGE)
            for attempt, seq, data in page:
                after = (attempt, seq)
                yield sse_event(decoder.decode(data), f"{attempt}.{seq}")
            if page:
                quiet = time.monotonic()
                continue
            # the job's status was read before its chunks: once it finished, its runner had
            # stored every chunk, so none can come after the end
            if job is None or job.status in FINISHED:
                end = {"status": job.status if job else "unknown",
                       "failure_reason": job.failure_reason if job else None,
                       "exit_code": job.exit_code if job else None}
                yield sse_event(json.dumps(end), event="end")
                return
            if time.monotonic() - quiet > KEEPALIVE_S:
                quiet = time.monotonic()
                yield b": keep-alive\n\n"
            else:
                yield b""
            await asyncio.sleep(POLL_S)

    @app.get("/api/v1/jobs/{job_id}/artifacts")
    def artifacts(job_id: str = JobId) -> list[dict[str, Any]]:
        job_or_404(job_id)
        return [{"path": a.path, "sha256": a.sha256, "size": a.size}
                for a in store.job_artifacts(job_id)]

    @app.get("/api/v1/jobs/{job_id}/artifacts/{path:path}", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def artifact(path: str, job_id: str = JobId) -> Response:
        if not 0 < len(path) <= MAX_ARTIFACT_PATH:
            raise HTTPException(404, "no such artifact")
        job_or_404(job_id)
        found = next((a for a in store.job_artifacts(job_id) if a.path == path), None)
        size = store.has_blob(found.sha256) if found is not None else None
        if found is None or size is None:
            raise HTTPException(404, "no such artifact (or it is not stored on the server)")
        name = urllib.parse.quote(path.rsplit("/", 1)[-1], safe="")
        return BoundedStream(_in_threads(_slices(found.sha256, size)),
                             "application/octet-stream", downloads, headers={
            "Content-Length": str(size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
            "Content-Security-Policy": "sandbox", "X-Stockade-Sha256": found.sha256})

    def _slices(sha256: str, size: int) -> Iterator[bytes]:
        """The blob a slice at a time, each read when the client took the one before (a
        whole artifact in memory per download let slow readers hold gigabytes)."""
        for offset in range(0, size, DOWNLOAD_SLICE):
            part = store.read_blob(sha256, offset, DOWNLOAD_SLICE)
            if not part:  # gone meanwhile (pruned): the client sees the body end short
                raise Truncated(f"artifact {sha256} went away during its download")
            yield part
