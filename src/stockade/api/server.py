"""The HTTP API of ``stockade server`` (FastAPI), over the same control-plane core as the CLI.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)

Versioned under ``/api/v1``, OpenAPI at ``/openapi.json``; ``/healthz`` says the process is up
and ``/readyz`` that the database answers. Every ``/api/v1`` request carries an API token
(``Authorization: Bearer stk_...``, see :mod:`.auth`), checked from the headers alone before
any body is read (:class:`Gate`), which also holds every body to a size and a deadline
(:class:`Body`) and lets only a few big ones (kept in memory) in at a time; refusals are audit
events, at most ``REFUSALS_PER_MINUTE`` of them a minute (the rest are counted into one event).
Runner agents use ``/api/v1/enrol`` (authenticated by their enrolment token and attestation,
in the body) and then ``/api/v1/runner/`` with their session token (``api/runners.py``,
docs/fleet.md); their claims and completions are read whole first when their bodies are
small (as a request without credentials: in one of their slots, unless the body came with
the head), and their session is checked in the same store turn as their work
(``Gate._at_once``). The routes for people and
their tools are in ``api/jobs.py``.
"""

import asyncio
import contextlib
import gc
import sys
import time
import typing
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from stockade.api import auth
from stockade.api.common import (
    ApiContext,
    Slots,
    StoreCalls,
    Unauthenticated,
    Waker,
    authenticated,
    record_refusal,
)
from stockade.api.connections import BODY_IN, client_key
from stockade.audit import AuditEvent
from stockade.config import Settings
from stockade.control import ControlService
from stockade.control.fleet import SESSION_PREFIX, AuditBudget, FleetService
from stockade.store.interface import TokenRow
from stockade.text import escape_controls

MAX_BODY_BYTES = 512 * 1024  # a JSON body: e.g. a spec, escaped, and a few fields
REFUSALS_PER_MINUTE = 60
BIG_BODY_BYTES = 1024 * 1024  # bodies larger than this (workspaces, artifacts) ...
BIG_BODIES_AT_ONCE = 4  # ... are read this many at a time per server process,
BIG_BODIES_PER_CALLER = 2  # ... this many of them for one token or runner
BIG_BODY_WAIT_S = 10.0  # a big body waits this long for its turn, then gets 503
BODY_GRACE_S = 30.0  # a body may take this long to arrive, ...
BODY_BYTES_PER_S = 1024 * 1024  # ... or as long as it takes at this rate, keeping pace
# with it past the grace (a 256 MiB upload trickled at a byte a second held an upload slot
# for 256 s); then 408
OPEN_BODY_GRACE_S = 5.0  # an enrolment's body (no credentials: one is small) within this
OPEN_REQUESTS = 32  # requests that need no credentials served at once (of MAX_REQUESTS)
OPEN_PER_CLIENT = 4  # ... of one client address (an IPv6 /64)


class Refusals:
    """Audits refused requests, at most ``REFUSALS_PER_MINUTE`` a minute; the rest of a minute
    are counted into one ``api.refused_more`` event (unauthenticated clients cannot grow the
    trail without bound)."""

    def __init__(self, control: ControlService, count: Callable[[], None]) -> None:
        self.control, self.count = control, count
        self._budget = AuditBudget("api.refused_more", REFUSALS_PER_MINUTE)

    def __call__(self, path: str, why: str, client: str, claimed: str | None) -> None:
        """Audit one refusal (or count it, past the minute's budget)."""
        events = self.events(path, why, client, claimed)
        if events:
            self.control.store.record(events)

    def events(self, path: str, why: str, client: str, claimed: str | None
               ) -> list[AuditEvent]:
        """Count one refusal: the audit events to record for it (none past the budget)."""
        self.count()
        detail = {"path": path[:200], "reason": why, "client": client}
        if claimed:  # what the request said, not who sent it
            detail["claimed_token"] = claimed
        return self._budget.admit(AuditEvent("api", "api.refused", time.time(), None, detail))


class Gate:
    """Authenticates every ``/api/`` request from its headers before anything reads its body
    and refuses a body over the path's limit (``limit_for``), declared or streamed.

    ``/api/v1/enrol``: no bearer (the body carries the enrolment token or the attestation).
    ``/api/v1/runner/``: a runner session (``scope["state"]["runner"]``). Anything else: an API
    token (``scope["state"]["token"]``); GET needs a viewer, anything else a submitter, and
    endpoints ask for more where they need it."""

    def __init__(self, app: Any, ctx: ApiContext, refusals: Refusals,
                 limit_for: Callable[[str, str], int]) -> None:
        from stockade.api.fastpath import FastPath

        self.app, self.ctx, self.control = app, ctx, ctx.control
        self.refusals, self.limit_for, self.store_calls = refusals, limit_for, ctx.store_calls
        self.fast = FastPath(ctx, app)  # well-formed hot requests (it passes on the others)
        self._big = asyncio.Semaphore(BIG_BODIES_AT_ONCE)
        # big bodies being read, of each token or runner (the semaphore bounds them all)
        self._big_of = Slots(sys.maxsize, BIG_BODIES_PER_CALLER)
        # requests without credentials being served, of each client address
        self._open = Slots(OPEN_REQUESTS, OPEN_PER_CLIENT)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Check, then pass the request on with its body counted; at most
        ``OPEN_REQUESTS`` of those that need no credentials at once (enrolments, the OpenAPI
        schema; not the health checks, which hold nothing), ``OPEN_PER_CLIENT`` of one
        client address (more get 503), so that clients without any cannot take every
        request the server serves at once (``connections.Busy``), nor one client the
        enrolments of all."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # (as FastAPI sets it: what is served here finds its state)
        path = scope["path"]
        if (path.startswith("/api/") or path == "/metrics") and not _enrolment(path):
            await self._checked(scope, receive, send)
            return
        if path in ("/healthz", "/readyz"):  # (small answers, no body: nothing to hold)
            await self.app(scope, receive, send)
            return
        with self._open.held(client_key(scope.get("client"))) as full:
            if full:
                await JSONResponse({"detail": "the server is busy; try again"}, 503,
                                   headers={"Retry-After": "1", "Connection": "close"}
                                   )(scope, receive, send)
            elif _enrolment(path):
                await self._checked(scope, receive, send)
            else:
                await self.app(scope, receive, send)

    async def _checked(self, scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or ())
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        # (the scheme's name is case-insensitive: RFC 9110, 11.1)
        bearer = bearer[7:].strip() if bearer[:7].lower() == "bearer " else ""
        path = scope["path"]
        state: dict[str, Any] = {}
        if path.startswith("/api/v1/runner/"):
            if await self._at_once(scope, receive, send, bearer, headers):
                return
            status, why, claimed = await self._runner(bearer, state)
        elif _enrolment(path):
            status, why, claimed = 0, "", None
        else:
            status, why, claimed = await self._token(scope, bearer, state)
        declared = headers.get(b"content-length", b"0").strip(b" \t")
        limit = self.limit_for(scope["method"], path)
        if not status and (not declared.isdigit() or int(declared) > limit):
            status, why = 413, f"the body is larger than {limit} bytes"
        if status:
            await self._refuse(scope, receive, send, status, why, claimed)
            return
        scope.setdefault("state", {}).update(state)
        chunked = b"transfer-encoding" in headers
        if limit <= BIG_BODY_BYTES or not (chunked or int(declared) > BIG_BODY_BYTES):
            grace = OPEN_BODY_GRACE_S if _enrolment(path) else BODY_GRACE_S
            await self.fast(scope, Body(receive, limit, int(declared), chunked, grace), send)
            return
        with self._big_of.held(_caller_key(state)) as full:
            if full:
                await _busy(f"this caller has {BIG_BODIES_PER_CALLER} uploads under way; send "
                            "one when another ended", scope, receive, send)
                return
            try:  # uploads are held in memory: a few at a time
                async with asyncio.timeout(BIG_BODY_WAIT_S):
                    await self._big.acquire()
            except TimeoutError:
                await _busy("the server is busy with other uploads; try again", scope,
                            receive, send)
                return
            try:
                await self.app(scope, Body(receive, limit, int(declared), chunked), send)
            finally:
                self._big.release()

    async def _refuse(self, scope: Any, receive: Any, send: Any, status: int, why: str,
                      claimed: str | None) -> None:
        """Answer ``status`` (why), audited unless it is a 413."""
        if status != 413:
            await record_refusal(self.ctx, self.refusals, scope, why, claimed)
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse({"detail": why}, status, headers=extra)(scope, receive, send)

    async def _at_once(self, scope: Any, receive: Any, send: Any, bearer: str,
                       headers: dict[bytes, bytes]) -> bool:
        """Serve a runner's claim or completion (those ``FastPath.at_once`` takes, with a
        small body) with its session read in the same turn of the store thread as its work,
        not in a turn of its own first. Its body is read before the session is checked, as
        if it had no credentials: holding one of their slots until the body is in (one that
        came with the head, ``connections.BODY_IN``, holds none and waits for nothing), for
        ``OPEN_BODY_GRACE_S`` at most; a body slower than that (a slow link) gets its session
        checked first, then the rest of its time as any body. False: not such a request
        (also one that expects ``100 Continue``, which would tell a client without a session
        to send its body), or no slot is free (then it is authenticated first, as any
        other)."""
        from stockade.api.fastpath import read_into, replay

        declared = headers.get(b"content-length", b"0").strip(b" \t")
        largest = self.fast.at_once(scope)
        if largest is None or b"transfer-encoding" in headers or b"expect" in headers \
                or not declared.isdigit() or int(declared) > largest \
                or auth.split(bearer, SESSION_PREFIX) is None:
            return False
        body, data = Body(receive, largest, int(declared), False), bytearray()
        state = scope.setdefault("state", {})
        try:
            if state.get(BODY_IN):  # it came with the head: no slot to hold, no wait
                await read_into(receive, data)
            elif not body.done:  # (a claim has no body)
                with self._open.held(client_key(scope.get("client"))) as full:
                    if full:
                        return False
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(OPEN_BODY_GRACE_S):
                            await read_into(body, data)
            if state.get(BODY_IN) or body.done:
                state["bearer"] = bearer
            else:
                status, why, claimed = await self._runner(bearer, state)
                if status:
                    await self._refuse(scope, receive, send, status, why, claimed)
                    return True
                await read_into(body, data)
        except HTTPException as e:
            await JSONResponse({"detail": e.detail}, e.status_code, headers=e.headers
                               )(scope, receive, send)
            return True
        try:
            await self.fast(scope, replay(bytes(data), receive), send)
        except Unauthenticated as e:
            await self._refuse(scope, receive, send, 401, e.why, _claimed(bearer))
        return True

    async def _token(self, scope: Any, bearer: str, state: dict[str, Any]
                     ) -> tuple[int, str, str | None]:
        parts = auth.split(bearer)
        if parts is None:
            return 401, "no valid bearer token", None
        row = await self.store_calls.joined(self._tokens, parts[0], reads=True)
        why = auth.refusal(row, parts[1], time.time())
        if why is not None or row is None:
            return 401, why or "unknown token", parts[0]
        needed = "viewer" if scope["method"] in ("GET", "HEAD") else "submitter"
        if not auth.allows(row.role, needed):
            return 403, f"the {row.role} role may not do this", parts[0]
        state["token"] = row
        return 0, "", None

    def _tokens(self, token_ids: list[str]) -> list[TokenRow | None]:
        """The API token of each id: those of a store batch's requests in one read, before
        its write transaction (on PostgreSQL, a read in it is a round trip under the audit
        head)."""
        found = self.control.store.get_tokens(sorted(set(token_ids)))
        return [found.get(i) for i in token_ids]

    async def _runner(self, bearer: str, state: dict[str, Any]) -> tuple[int, str, str | None]:
        try:
            state["runner"] = await authenticated(self.ctx, bearer)
        except Unauthenticated as e:
            return 401, e.why, _claimed(bearer)
        return 0, "", None


async def _busy(why: str, scope: Any, receive: Any, send: Any) -> None:
    """503 for an upload that cannot be read now (the client asks again in 5 s)."""
    await JSONResponse({"detail": why}, 503, headers={"Retry-After": "5",
                                                      "Connection": "close"}
                       )(scope, receive, send)


def _caller_key(state: dict[str, Any]) -> str:
    """Whose request it is, as the gate authenticated it: a token's id or a runner's."""
    if (token := state.get("token")) is not None:
        return f"token:{token.id}"
    runner = state.get("runner")
    return f"runner:{runner.runner.id}" if runner is not None else ""


def _claimed(bearer: str) -> str | None:
    """The runner session a refused token says it is (as refusals record it)."""
    return bearer.removeprefix(SESSION_PREFIX).split("_")[0][:40] or None


def _enrolment(path: str) -> bool:
    """Whether ``path`` is an enrolment's (authenticated by its body, not its headers)."""
    return path == "/api/v1/enrol" or path.startswith("/api/v1/enrol/")


class Body:
    """The ``receive`` an endpoint reads a request through: the body is counted against
    ``limit`` (413) and must arrive within ``grace`` (``BODY_GRACE_S`` unless given) or at
    ``BODY_BYTES_PER_S`` of its declared or received size, whichever is longer, keeping pace
    with that rate past the grace (what came by time t at least (t - grace) x the rate), else
    408 (the connection is closed). Once the body is complete, ``receive`` is the server's
    (which then waits for a disconnect)."""

    def __init__(self, receive: Any, limit: int, declared: int, chunked: bool,
                 grace: float = BODY_GRACE_S) -> None:
        self.receive, self.limit, self.declared, self.grace = receive, limit, declared, grace
        self.seen, self.done = 0, not (chunked or declared)
        self.started = time.monotonic()

    async def __call__(self) -> Any:
        """The next message of the request."""
        if self.done:
            return await self.receive()
        allowed = min(max(self.grace, max(self.declared, self.seen) / BODY_BYTES_PER_S),
                      self.grace + self.seen / BODY_BYTES_PER_S)
        try:
            async with asyncio.timeout(self.started + allowed - time.monotonic()):
                message = await self.receive()
        except TimeoutError:
            raise HTTPException(408, f"the body did not arrive within {allowed:.0f} s",
                                headers={"Connection": "close"}) from None
        self.seen += len(message.get("body", b""))
        self.done = message["type"] != "http.request" or not message.get("more_body")
        if self.seen > self.limit:
            raise HTTPException(413, f"the body is larger than {self.limit} bytes",
                                headers={"Connection": "close"})
        return message


def create_app(settings: Settings, control: ControlService, fleet: FleetService) -> Gate:
    """The application: the FastAPI app (``.app``) behind its :class:`Gate`, outside
    FastAPI's own layers (its telemetry, error and body-limit middlewares: per request, more
    than the gate's work for a runner's claim); ``control`` and ``fleet`` are shared by all
    requests (the store serialises them). While it runs, a task looks for expired leases
    (:func:`_sweeper`)."""
    from stockade.api import admin, joblogs, jobs, metrics, runners

    store_calls = StoreCalls(control.store, fleet.authenticate_all)
    ctx = ApiContext(settings, control, fleet, Waker(), metrics.Metrics(control.store),
                     store_calls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settle_heap()
        task = asyncio.create_task(_sweeper(fleet))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store_calls.close()

    app = FastAPI(title="stockade", version="1", docs_url=None, redoc_url=None,
                  redirect_slashes=False, lifespan=lifespan, **_no_telemetry())
    app.state.refusals = refusals = Refusals(control, ctx.metrics.refusals.inc)

    names: set[str] = set()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not names:  # every route is added by now
            names.update(field_names(app))
        problems = [problem(e, names) for e in exc.errors()[:10]]
        return JSONResponse({"detail": problems}, 422)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> Response:
        """A client that went during its body (an upload it dropped): nothing to answer,
        and nothing for the server's log (a traceback each time, which clients could fill)."""
        return Response(status_code=400)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        from stockade.store.sql import HEAD_REVISION

        try:
            revision = control.store.schema_revision()
        except Exception as e:  # any database problem: not ready, say which
            return JSONResponse({"status": "unavailable", "reason": str(e)[:200]}, 503)
        if revision != HEAD_REVISION:
            return JSONResponse({"status": "unavailable", "reason": f"the database schema is "
                                 f"at {str(revision)[:20]!r}, this server needs "
                                 f"{HEAD_REVISION!r}"}, 503)
        return JSONResponse({"status": "ready"})

    runners.add_routes(app, ctx)  # first: routes are matched in order, these are the busiest
    jobs.add_routes(app, ctx)
    joblogs.add_routes(app, ctx)
    admin.add_routes(app, ctx)
    metrics.add_routes(app, ctx.metrics)
    return Gate(app, ctx, refusals, _limits(settings))


def _no_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry off, where it has any (0.16x): stockade sets up none, and
    each request looked for its providers (2% of the CPU of a runner's claim)."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def problem(error: Any, names: set[str]) -> str:
    """One validation error, told without repeating what the request sent: a place in the
    body is named by our own field names and list positions only (any other key is
    ``<key>``), an unknown field is "an unknown field", and the message is escaped."""
    loc = list(error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        return f"{_place(loc[:-1], names)}: an unknown field (not allowed here)"
    return f"{_place(loc, names)}: {escape_controls(str(error.get('msg', '')))[:200]}"


def _place(loc: list[Any], names: set[str]) -> str:
    parts = [str(p) if isinstance(p, int) or (isinstance(p, str) and p in names) else "<key>"
             for p in loc]
    return ".".join(parts)[:200] or "the request"


def field_names(app: FastAPI) -> set[str]:
    """The names of every parameter and body field the routes of ``app`` declare."""
    names = {"body", "query", "path", "header", "cookie"}
    seen: set[Any] = set()

    def annotation(kind: Any) -> None:
        if kind in seen:
            return
        seen.add(kind)
        for arg in typing.get_args(kind):
            annotation(arg)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            for name, field in kind.model_fields.items():
                names.update(n for n in (name, field.alias) if n)
                annotation(field.annotation)

    def dependant(d: Any) -> None:
        for param in (*d.path_params, *d.query_params, *d.header_params, *d.cookie_params,
                      *d.body_params):
            names.update((param.name, param.alias))
            annotation(param.field_info.annotation)
        for sub in d.dependencies:
            dependant(sub)

    for route in app.routes:
        if isinstance(route, APIRoute):
            dependant(route.dependant)
    return names


def _limits(settings: Settings) -> Callable[[str, str], int]:
    """``limit_for(method, path)``: the largest body a request to ``path`` may send."""
    from stockade.api.jobs import upload_limit
    from stockade.api.runners import LOG_CHUNK_MAX

    artifact, upload = settings.artifact_max_file_bytes, upload_limit(settings)

    def limit_for(method: str, path: str) -> int:
        if method in ("PUT", "POST"):
            if path.startswith("/api/v1/runner/jobs/") and "/artifacts/" in path:
                return artifact
            if path.startswith("/api/v1/runner/jobs/") and "/log/" in path:
                return LOG_CHUNK_MAX
            if path == "/api/v1/workspaces":
                return upload
        return MAX_BODY_BYTES

    return limit_for


def settle_heap() -> None:
    """Take what the started process holds for good (its modules, the app, its routes: most
    of its objects) out of the cyclic garbage collector's sight: every full collection went
    through all of them with the event loop stopped, 80-140 ms every 2-4 s under load on
    this project's 2-core machines (the p99 claim latency: benchmarks/dispatch.py), and
    2-7 ms once they are out. Garbage made before is collected first."""
    gc.collect()
    gc.freeze()


async def _sweeper(fleet: FleetService) -> None:
    """Every third of a lease, fail or requeue attempts whose lease ran out. It starts one
    lease after the server did, so that runners that kept working while no server ran (a
    restart) have had the time to heartbeat again."""
    await asyncio.sleep(fleet.policy.lease_s)
    while True:
        with contextlib.suppress(Exception):  # a database hiccup: try again next round
            await run_in_threadpool(fleet.sweep)
        await asyncio.sleep(max(0.5, fleet.policy.lease_s / 3))
