"""The routes of runner agents: enrolment and attestation (``/api/v1/enrol``), then, with a
session token, claims, heartbeats, log chunks, artifacts, secrets and completion
(``/api/v1/runner/``). Every write names its job and attempt; the store refuses writes of an
attempt that no longer holds its job (409), so a runner that lost its lease changes nothing.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from stockade.api.common import ApiContext, runner_of
from stockade.api.protocol import Assignment
from stockade.api.wire import (
    MAX_REPORT_DETAIL,
    REPORT_ACTIONS,
    AssignmentOut,
    AttestRequest,
    CompletedOut,
    CompletionIn,
    EnrolRequest,
    HeartbeatOut,
    RedeemIn,
    ReportIn,
    SessionOut,
)
from stockade.control.fleet import Caller, ClaimWork, Completed, CompleteWork, Session
from stockade.errors import PolicyDenied

LOG_CHUNK_MAX = 1024 * 1024
MAX_WAIT_S = 30.0
POLL_S = 0.25  # a waiting claim looks again this often (jobs queued through other replicas)
_JOB = r"^[A-Za-z0-9]{1,64}$"
_SHA = r"^[0-9a-f]{64}$"


def _session(s: Session) -> SessionOut:
    return SessionOut(**s._asdict())


def _answer(status: int, out: Any) -> Response:
    """What :func:`heartbeat`, :func:`log_chunk` or :func:`complete` answered, as a response
    (serialised once: FastAPI would validate it again first)."""
    if isinstance(out, bytes):
        return Response(out, status, media_type="application/json")
    if status >= 400:
        raise HTTPException(status, out["detail"])
    return Response(json.dumps(out), status, media_type="application/json")


def assignment_json(a: Assignment) -> bytes:
    """The wire form of an assignment (``AssignmentOut``), serialised."""
    return AssignmentOut.of(a).model_dump_json().encode()


# What the hot routes do, shared by their FastAPI routes here and by api/fastpath.py.

async def _served(ctx: ApiContext, who: Caller | str, make: Callable[[Caller], Any]
                  ) -> tuple[Caller, Any]:
    """``(caller, result)`` of ``fleet.serve`` for the work ``make`` makes for the runner
    ``who`` is: the caller the gate authenticated, or its session token, authenticated in
    the same turn of the store thread (``StoreCalls.as_runner``: raises ``Unauthenticated``)."""
    if isinstance(who, Caller):
        return who, await ctx.store_calls.joined(ctx.fleet.serve, make(who))
    return await ctx.store_calls.as_runner(ctx.fleet.serve, who, make)


async def claim(ctx: ApiContext, who: Caller | str, wait: float, receive: Any
                ) -> bytes | None:
    """The runner's next job (an ``AssignmentOut``, serialised), waiting up to ``wait``
    seconds for one, or None. The poll ends early when the client goes away (``receive``:
    the request's, after its body, tells that), and when the server is stopping. ``who``:
    see :func:`_served`."""
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        deadline = time.monotonic() + wait
        while True:
            who, a = await _served(ctx, who, ClaimWork)
            if a is not None:
                ctx.metrics.claims.inc()
                return assignment_json(a)
            left = deadline - time.monotonic()
            if left <= 0 or gone.done() or ctx.waker.closing:
                return None
            await ctx.waker.wait(min(left, POLL_S), gone)
    finally:
        gone.cancel()


async def disconnected(receive: Any) -> None:
    """Returns once the client has gone (after the body, ``receive`` waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# The others answer ``(status, JSON object or serialised bytes)``, each in one store call.

async def heartbeat(ctx: ApiContext, caller: Caller, job_id: str, attempt: int
                    ) -> tuple[int, Any]:
    """Extend the attempt's lease: whether it still holds the job and is to stop."""
    ok, cancel = await ctx.store_calls(ctx.fleet.heartbeat, caller, job_id, attempt)
    if not ok:
        return 409, {"detail": "this attempt no longer holds the job"}
    return 200, {"held": True, "cancel": cancel}


async def log_chunk(ctx: ApiContext, caller: Caller, job_id: str, attempt: int, seq: int,
                    data: bytes) -> tuple[int, Any]:
    """Store one chunk of the attempt's log (idempotent: a retried chunk is not stored twice)."""
    state = await ctx.store_calls(ctx.fleet.put_log, caller, job_id, attempt, seq, data)
    if state in ("fenced", "conflict"):
        return 409, {"detail": f"chunk refused: {state}"}
    if state == "full":
        return 413, {"detail": "the job's log is full"}
    return 201, {"state": state}


async def complete(ctx: ApiContext, who: Caller | str, job_id: str, attempt: int,
                   body: CompletionIn, take_next: bool, gone: Callable[[], bool]
                   ) -> tuple[int, Any]:
    """Record the attempt's outcome and, with ``take_next`` (unless the client is ``gone``),
    claim the runner's next job, in one store call (a transaction, or a batch's). ``who``:
    see :func:`_served`."""

    def work(caller: Caller) -> CompleteWork:
        return CompleteWork(caller, body.completion(job_id, attempt, caller.runner.id),
                            take_next, gone)

    done: Completed = (await _served(ctx, who, work))[1]
    if done.refusal is not None:
        return 422, {"detail": done.refusal}
    if not done.held and not done.replayed:
        return 409, {"detail": "this attempt no longer holds the job"}
    if done.held and done.next is not None:
        ctx.metrics.claims.inc()
    out = done.next
    nxt = b"null" if out is None else assignment_json(out)
    return 200, b'{"recorded":true,"next":' + nxt + b"}"


def add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Add the runner routes to ``app``."""
    fleet, control = ctx.fleet, ctx.control
    JobId = Path(pattern=_JOB)
    Attempt = Path(ge=1, le=1000)

    @app.post("/api/v1/enrol/nonce")
    def nonce() -> dict[str, str]:
        return {"nonce": fleet.nonce()}

    attestations = ctx.metrics.attestations

    @app.post("/api/v1/enrol")
    def enrol(body: EnrolRequest) -> SessionOut:
        try:
            session = fleet.enrol(body.token, body.nonce, body.public_key, body.name,
                                  body.labels, body.concurrency, body.measurements,
                                  body.signature)
        except PolicyDenied as e:
            attestations.labels("enrol", "refused").inc()
            raise HTTPException(403, e.message) from e
        attestations.labels("enrol", "passed").inc()
        return _session(session)

    @app.post("/api/v1/enrol/attest")
    def attest(body: AttestRequest) -> SessionOut:
        try:
            session = fleet.reattest(body.runner_id, body.nonce, body.measurements,
                                     body.signature)
        except PolicyDenied as e:
            attestations.labels("session", "refused").inc()
            raise HTTPException(403, e.message) from e
        attestations.labels("session", "passed").inc()
        return _session(session)

    @app.post("/api/v1/runner/claim", response_model=AssignmentOut,
              responses={204: {"description": "no job for now"}})
    async def claim_route(request: Request, wait: float = Query(0.0, ge=0, le=MAX_WAIT_S)
                          ) -> Response:
        out = await claim(ctx, runner_of(request), wait, request.receive)
        return Response(status_code=204) if out is None else \
            Response(out, media_type="application/json")

    def held(caller: Caller, job_id: str, attempt: int) -> None:
        if not fleet.store.holds(job_id, attempt, caller.runner.id):
            raise HTTPException(409, "this attempt no longer holds the job")

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/heartbeat", response_model=HeartbeatOut)
    async def heartbeat_route(request: Request, job_id: str = JobId, attempt: int = Attempt
                              ) -> Response:
        return _answer(*await heartbeat(ctx, runner_of(request), job_id, attempt))

    @app.put("/api/v1/runner/jobs/{job_id}/{attempt}/log/{seq}", status_code=201,
             response_model=dict[str, str])
    async def log_route(request: Request, job_id: str = JobId, attempt: int = Attempt,
                        seq: int = Path(ge=0, le=10**9)) -> Response:
        data = await request.body()
        return _answer(*await log_chunk(ctx, runner_of(request), job_id, attempt, seq, data))

    @app.put("/api/v1/runner/jobs/{job_id}/{attempt}/artifacts/{sha256}", status_code=201)
    async def artifact(request: Request, job_id: str = JobId, attempt: int = Attempt,
                       sha256: str = Path(pattern=_SHA)) -> dict[str, str]:
        caller = runner_of(request)
        data = await request.body()
        why = await run_in_threadpool(fleet.put_artifact, caller, job_id, attempt, sha256,
                                      data)
        if why == "fenced":
            raise HTTPException(409, "this attempt no longer holds the job")
        if why:
            raise HTTPException(422, why)
        return {"sha256": sha256}

    @app.get("/api/v1/runner/jobs/{job_id}/{attempt}/workspace")
    def workspace(request: Request, job_id: str = JobId, attempt: int = Attempt) -> Response:
        held(runner_of(request), job_id, attempt)
        job = control.job(job_id)
        data = fleet.store.get_blob(job.workspace_sha256) \
            if job is not None and job.workspace_sha256 else None
        if data is None:
            raise HTTPException(404, "this job has no workspace archive")
        return Response(data, media_type="application/x-tar")

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/complete", response_model=CompletedOut)
    async def complete_route(body: CompletionIn, request: Request, job_id: str = JobId,
                             attempt: int = Attempt,
                             take_next: bool = Query(False, alias="next",
                                                     description="also claim the runner's next "
                                                     "job (without waiting) and return it as "
                                                     "`next`")) -> Response:
        gone = await request.is_disconnected()
        return _answer(*await complete(ctx, runner_of(request), job_id, attempt, body,
                                       take_next, lambda: gone))

    def secrets_allowed(caller: Caller, job_id: str, attempt: int) -> None:
        held(caller, job_id, attempt)
        if not fleet.may_use_secrets(caller):
            raise HTTPException(403, "this runner is not attested: no secrets or ID tokens")

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/redeem")
    def redeem(body: RedeemIn, request: Request, job_id: str = JobId,
               attempt: int = Attempt) -> dict[str, str]:
        caller = runner_of(request)
        secrets_allowed(caller, job_id, attempt)
        try:
            value = control.redeem(body.lease_id, job_id, attempt, caller.runner.id)
        except PolicyDenied as e:
            raise HTTPException(403, e.message) from e
        return {"value": base64.b64encode(value).decode()}

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/id-token")
    def id_token(request: Request, job_id: str = JobId, attempt: int = Attempt
                 ) -> dict[str, str]:
        caller = runner_of(request)
        secrets_allowed(caller, job_id, attempt)
        try:
            return {"token": control.mint_id_token(job_id, attempt, caller.runner.id)}
        except PolicyDenied as e:
            raise HTTPException(403, e.message) from e

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/report", status_code=204)
    def report(body: ReportIn, request: Request, job_id: str = JobId,
               attempt: int = Attempt) -> Response:
        caller = runner_of(request)
        held(caller, job_id, attempt)
        if any(action not in REPORT_ACTIONS for action, _ in body.events):
            raise HTTPException(422, "a runner reports only these events: "
                                     f"{', '.join(sorted(REPORT_ACTIONS))}")
        if any(len(json.dumps(detail)) > MAX_REPORT_DETAIL for _, detail in body.events):
            raise HTTPException(413, f"an event's detail is over {MAX_REPORT_DETAIL} bytes")
        control.report(job_id, [(action, {**detail, "attempt": attempt})
                                for action, detail in body.events],
                       actor=f"runner:{caller.runner.id}")
        return Response(status_code=204)
