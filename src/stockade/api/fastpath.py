"""The runner routes every job goes through (claim, heartbeat, log chunk, completion) and the
submission of a job, served without the framework when the request is well formed: the same
work as their routes in ``api/runners.py`` and ``api/jobs.py`` (the same functions do it),
minus FastAPI's routing, parameter solving and response validation, which cost more than the
work itself at a fleet's rate of claims (a submission: a fifth of its CPU).

The gate (``api/server.py``) authenticates the runner or the API token from the headers first
(and checks the token's role), as for every route; but a runner's claim or completion that
:meth:`FastPath.at_once` takes comes with its session token unchecked, read with its work in
one turn of the store thread (``StoreCalls.as_runner``). A request this module does not take
as it is (another method, a path or query it does not parse, a body that does not validate)
goes on to FastAPI with its body, authenticated first, whose route answers it: the errors,
the status codes and the OpenAPI schema are the framework's.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import HTTPException
from pydantic import BaseModel, ValidationError

from stockade.api import jobs, runners
from stockade.api.common import authenticated
from stockade.api.jobs import SubmitRequest
from stockade.api.wire import CompletionIn

if TYPE_CHECKING:
    from stockade.api.common import ApiContext
    from stockade.control.fleet import Caller
    from stockade.store.interface import TokenRow

_JOB_PATH = re.compile(r"/api/v1/runner/jobs/([A-Za-z0-9]{1,64})/([1-9][0-9]{0,3})/"
                       r"(heartbeat|complete|log/(0|[1-9][0-9]{0,9}))")
_WAIT = re.compile(rb"(?:wait=([0-9]{1,2}(?:\.[0-9]{1,6})?))?")
_NEXT = re.compile(rb"(?:next=(true|false))?")
_JSON = [(b"content-type", b"application/json")]
AT_ONCE_COMPLETION_BYTES = 16 * 1024  # a completion read before its session is checked

Send = Any
Receive = Any
M = TypeVar("M", bound=BaseModel)


class FastPath:
    """Serves the well-formed hot requests, and passes every other on to FastAPI (see the
    module docstring)."""

    def __init__(self, ctx: ApiContext, app: Any) -> None:
        self.ctx, self.app = ctx, app

    @staticmethod
    def at_once(scope: Any) -> int | None:
        """If this runner request is one served here with its session token checked in the
        same store turn as its work (a claim or a completion this module parses), the
        largest body it may have to be (its body is read before the token is checked: a
        claim has none); None if not."""
        path, method, query = scope["path"], scope["method"], scope["query_string"]
        if method != "POST":
            return None
        if path == "/api/v1/runner/claim":
            return 0 if _wait(query) is not None else None
        m = _JOB_PATH.fullmatch(path)
        if m is not None and int(m.group(2)) <= 1000 and m.group(3) == "complete" \
                and _NEXT.fullmatch(query) is not None and _json_body(scope):
            return AT_ONCE_COMPLETION_BYTES
        return None

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        """Serve the request, or pass it on to FastAPI. A runner's request comes with its
        caller (``state["runner"]``) or, if :meth:`at_once` takes it, its session token
        (``state["bearer"]``: ``Unauthenticated`` if it authenticates no runner)."""
        path, method, query = scope["path"], scope["method"], scope["query_string"]
        state = scope["state"]
        who: Caller | str | None = state.get("runner", state.get("bearer"))
        try:
            if who is None:
                if path == "/api/v1/jobs" and method == "POST" and not query \
                        and _json_body(scope):
                    await self._submit(state["token"], scope, receive, send)
                    return
            elif path == "/api/v1/runner/claim" and method == "POST":
                wait = _wait(query)
                if wait is not None:
                    await self._claim(who, wait, receive, send)
                    return
            elif (m := _JOB_PATH.fullmatch(path)) is not None and int(m.group(2)) <= 1000:
                job_id, attempt, what = m.group(1), int(m.group(2)), m.group(3)
                if what == "heartbeat" and method == "POST" and not query \
                        and not isinstance(who, str):
                    await self._heartbeat(who, job_id, attempt, send)
                    return
                if what == "complete" and method == "POST":
                    n = _NEXT.fullmatch(query)
                    if n is not None and _json_body(scope):
                        await self._complete(who, job_id, attempt, n.group(1) == b"true",
                                             scope, receive, send)
                        return
                elif m.group(4) is not None and method == "PUT" and not query \
                        and int(m.group(4)) <= 10**9 and not isinstance(who, str):
                    await self._log(who, job_id, attempt, int(m.group(4)), receive, send)
                    return
        except HTTPException as e:  # the body's size or deadline (see server.Body)
            await _answer(send, e.status_code, {"detail": e.detail}, e.headers)
            return
        await self._pass(scope, receive, send)

    async def _pass(self, scope: Any, receive: Receive, send: Send) -> None:
        """On to FastAPI; a runner's request that came with its session token unchecked is
        authenticated first, as the gate does the others."""
        state = scope["state"]
        if "bearer" in state:
            state["runner"] = await authenticated(self.ctx, state.pop("bearer"))
        await self.app(scope, receive, send)

    async def _validated(self, model: type[M], scope: Any, receive: Receive, send: Send
                         ) -> M | None:
        """The request's body as ``model``; None once FastAPI's route answered a body that
        does not validate (it says what is wrong, in its words)."""
        data = await _body(receive)
        try:
            return model.model_validate_json(data)
        except ValidationError:
            await self._pass(scope, replay(data, receive), send)
            return None

    async def _submit(self, token: TokenRow, scope: Any, receive: Receive, send: Send
                      ) -> None:
        body = await self._validated(SubmitRequest, scope, receive, send)
        if body is None:
            return
        await _answer(send, 201, await jobs.submit_job(self.ctx, token, body, scope))

    async def _claim(self, who: Caller | str, wait: float, receive: Receive, send: Send
                     ) -> None:
        await _body(receive)
        out = await runners.claim(self.ctx, who, wait, receive)
        await _raw(send, 204 if out is None else 200, out or b"")

    async def _heartbeat(self, caller: Caller, job_id: str, attempt: int, send: Send) -> None:
        status, out = await runners.heartbeat(self.ctx, caller, job_id, attempt)
        await _answer(send, status, out)

    async def _log(self, caller: Caller, job_id: str, attempt: int, seq: int,
                   receive: Receive, send: Send) -> None:
        data = await _body(receive)
        status, out = await runners.log_chunk(self.ctx, caller, job_id, attempt, seq, data)
        await _answer(send, status, out)

    async def _complete(self, who: Caller | str, job_id: str, attempt: int, take_next: bool,
                        scope: Any, receive: Receive, send: Send) -> None:
        body = await self._validated(CompletionIn, scope, receive, send)
        if body is None:
            return
        gone = asyncio.ensure_future(runners.disconnected(receive))
        try:
            status, out = await runners.complete(self.ctx, who, job_id, attempt, body,
                                                 take_next, gone.done)
        finally:
            gone.cancel()
        if isinstance(out, bytes):
            await _raw(send, status, out)
        else:
            await _answer(send, status, out)


def _wait(query: bytes) -> float | None:
    """A claim's ``wait`` (0 if not given), if its query is one this module parses."""
    w = _WAIT.fullmatch(query)
    if w is None or float(w.group(1) or 0) > runners.MAX_WAIT_S:
        return None
    return float(w.group(1) or 0)


def _json_body(scope: Any) -> bool:
    """Whether the request's body is JSON as FastAPI sees it: its content type is
    ``application/json`` or ``application/...+json`` (FastAPI refuses anything else, and no
    content type: 422)."""
    value = next((v for k, v in scope["headers"] if k == b"content-type"), None)
    if value is None:
        return False
    media: bytes = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/")
                                           and media.endswith(b"+json"))


async def _body(receive: Receive) -> bytes:
    """The whole request body."""
    data = bytearray()
    await read_into(receive, data)
    return bytes(data)


async def read_into(receive: Receive, data: bytearray) -> None:
    """Read the rest of the request body onto ``data`` (what came stays there if this is
    cancelled: a message is taken whole or not at all)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise HTTPException(400, "the client went away")
        data += message.get("body", b"")
        if not message.get("more_body"):
            return


def replay(data: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``data`` as the whole body, then the server's."""
    sent = False

    async def again() -> Any:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return again


async def _answer(send: Send, status: int, out: Any,
                  headers: Mapping[str, str] | None = None) -> None:
    await _raw(send, status, json.dumps(out, separators=(",", ":")).encode(), headers)


async def _raw(send: Send, status: int, body: bytes,
               headers: Mapping[str, str] | None = None) -> None:
    head = [*_JSON, (b"content-length", b"%d" % len(body))] if status != 204 else []
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
