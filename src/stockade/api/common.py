"""What the API's route modules share: the server's parts, the caller of a request, and the
waker that ends runners' long polls when work arrives.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import asyncio
import collections
import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

from fastapi import Depends, HTTPException, Request

from stockade.api import auth
from stockade.config import Settings
from stockade.control import ControlService
from stockade.control.fleet import Caller, FleetService
from stockade.store.interface import TokenRow

if TYPE_CHECKING:
    from stockade.api.metrics import Metrics


class Waker:
    """Wakes one long poll of this server process per job queued here (requests that queue
    jobs call :meth:`notify`, from any thread): not all of them, which would all race for the
    one job. Polls also look again every few hundred milliseconds for jobs queued through
    another replica, or that the woken poll could not take (its labels)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closing = False  # the server is stopping: polls answer now, not at their end

    async def wait(self, timeout: float, gone: "asyncio.Future[Any]") -> None:
        """Until a :meth:`notify` picks this poll, ``timeout`` seconds, or ``gone`` is done
        (the client went away)."""
        self._loop = loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        self._waiting.append(woken)
        try:
            await asyncio.wait((woken, gone), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not woken.done():
                woken.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(woken)

    def notify(self) -> None:
        """Wake the longest-waiting poll (thread-safe)."""
        self._call(self._wake, False)

    def close(self) -> None:
        """The server is stopping: wake every poll, and polls wait no more (thread-safe)."""
        self.closing = True
        self._call(self._wake, True)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _wake(self, every: bool) -> None:
        while self._waiting:
            woken = self._waiting.popleft()
            if not woken.done():
                woken.set_result(None)
                if not every:
                    return


T = TypeVar("T")


MAX_BATCH = 32  # store calls at most in one transaction


class Slots:
    """At most ``limit`` of something (of ``what``: requests, logs, uploads) at once,
    ``per_key`` of them for one key (a client address, a token): taken and given back on the
    event loop, so plain counts."""

    def __init__(self, limit: int, per_key: int, what: str = "") -> None:
        self.limit, self.per_key, self.what, self.taken = limit, per_key, what, 0
        self._of: dict[str, int] = {}

    @contextlib.contextmanager
    def held(self, key: str) -> Iterator[str | None]:
        """One for ``key`` while the block runs, if one is free: None; else which limit is
        met, ``"all"`` or ``"key"``."""
        if self.taken >= self.limit or self._of.get(key, 0) >= self.per_key:
            yield "all" if self.taken >= self.limit else "key"
            return
        self.taken += 1
        self._of[key] = self._of.get(key, 0) + 1
        try:
            yield None
        finally:
            self.taken -= 1
            self._of[key] -= 1
            if not self._of[key]:
                del self._of[key]


class StoreCalls:
    """How the async routes call the store: in a thread of our own, never the event loop's,
    however short a call usually is (a SQLite write waits for another process's, up to its
    busy timeout, and every other request would wait with it). The thread takes every call
    queued when it comes free and runs them in one transaction (``Store.batched``): under
    load, concurrent requests share one commit; alone, a call is its own batch and waits for
    nothing. Runners' claims and completions (:meth:`joined`) are served together within
    their batch, as sets. One thread on either database: SQLite runs one write at a time
    anyway; on PostgreSQL a second thread's batches only waited for the first's at the audit
    head, and for the GIL while holding it (with two, p99 claim latency at half the capacity
    was 126-157 ms, with one 64-80 ms, and two replicas served 693-761 claims/s, with one
    thread each 817-887)."""

    def __init__(self, store: Any, authenticate: Callable[[list[str]], list[Any]]) -> None:
        self._store, self._authenticate = store, authenticate
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="store", daemon=True)
        self._thread.start()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the store thread."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._queue.put((functools.partial(fn, *args), done, loop))
        return await done

    async def joined(self, serve: Callable[[list[Any]], list[T]], work: Any,
                     reads: bool = False) -> T:
        """``serve([work])[0]`` in the store thread, served with the other works for ``serve``
        of its batch: ``serve(works)`` once for all of them (claims and completions as sets,
        see ``FleetService.serve``); if that fails, alone too, each work runs alone (so a
        work may run twice, as a retried request would: fencing makes that safe). ``reads``:
        ``serve`` only reads, and runs before the batch's other calls (outside its write
        transaction)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._queue.put((_Joined(serve, work, reads), done, loop))
        return await done

    async def as_runner(self, serve: Callable[[list[Any]], list[T]], bearer: str,
                        make: Callable[[Caller], Any]) -> tuple[Caller, T]:
        """``(caller, serve([make(caller)])[0])`` for the runner whose session token is
        ``bearer``, served as :meth:`joined`; its session is read with the others of its
        batch (one query) before the batch's writes: one turn of the store thread for both.
        Raises :class:`Unauthenticated` if the token authenticates no runner (nothing is
        served)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queue.put((_Joined(serve, make, False, bearer), done, loop))
        out = await done
        if isinstance(out, str):
            raise Unauthenticated(out)
        return out  # type: ignore[no-any-return]

    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < MAX_BATCH and items[-1] is not None:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            items = [i for i in items if i is not None and not i[1].cancelled()]
            if items:
                try:
                    outcomes = self._run([call for call, _, _ in items])
                except Exception as e:  # the commit failed: every call's error
                    outcomes = [(False, e)] * len(items)
                by_loop: dict[Any, list[Any]] = {}
                for (_, done, loop), outcome in zip(items, outcomes, strict=True):
                    by_loop.setdefault(loop, []).append((done, outcome))
                for loop, settled in by_loop.items():
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(_settle, settled)
            if stop:
                return

    def _run(self, calls: list[Any]) -> list[tuple[bool, Any]]:
        """The outcome of each call (a callable or a :class:`_Joined`), all in one batch:
        the sessions of the works sent with one (:meth:`as_runner`), the groups that read,
        the plain calls, the other groups."""
        groups: dict[Any, list[int]] = {}
        for n, call in enumerate(calls):
            if isinstance(call, _Joined):
                groups.setdefault(call.serve, []).append(n)
        callers: dict[str, Any] = {}  # session token -> its Caller, or why none
        bearers = sorted({c.bearer for c in calls
                          if isinstance(c, _Joined) and c.bearer is not None})
        units: list[tuple[Any, list[int]]] = [  # (serve or None, its calls' indexes)
            *(((_SESSIONS, []),) if bearers else ()),
            *((serve, ns) for serve, ns in groups.items() if calls[ns[0]].reads),
            *((None, [n]) for n, call in enumerate(calls) if not isinstance(call, _Joined)),
            *((serve, ns) for serve, ns in groups.items() if not calls[ns[0]].reads)]
        outcomes = self._store.batched(
            [functools.partial(self._sessions, callers, bearers) if serve is _SESSIONS else
             calls[ns[0]] if serve is None else
             functools.partial(self._serve, serve, [calls[n] for n in ns], callers)
             for serve, ns in units])
        out: list[tuple[bool, Any]] = [(False, None)] * len(calls)
        for (serve, ns), (ok, value) in zip(units, outcomes, strict=True):
            if serve is _SESSIONS:  # (if the read failed, each group reads its own)
                continue
            if serve is None or (not ok and len(ns) == 1):  # a plain call, a lone work's error
                out[ns[0]] = (ok, value)
            elif ok:
                for n, result in zip(ns, value, strict=True):
                    out[n] = (True, result)
            else:  # together they failed: each alone (the store isolates the one that fails)
                alone = self._store.batched([
                    functools.partial(self._serve, serve, [calls[n]], callers) for n in ns])
                for n, (ok, value) in zip(ns, alone, strict=True):
                    out[n] = (True, value[0]) if ok else (False, value)
        return out

    def _sessions(self, callers: dict[str, Any], bearers: list[str]) -> None:
        """Authenticate ``bearers`` into ``callers`` (one read)."""
        callers.update(zip(bearers, self._authenticate(bearers), strict=True))

    def _serve(self, serve: Callable[[list[Any]], list[Any]], joined: list["_Joined"],
               callers: dict[str, Any]) -> list[Any]:
        """``serve`` of the works of ``joined``. A work sent with a session token
        (:meth:`as_runner`) is made for the runner the token authenticates and answered as
        ``(caller, result)``; if the token authenticates none, why (and it is not served)."""
        missing = sorted({j.bearer for j in joined
                          if j.bearer is not None and j.bearer not in callers})
        if missing:
            self._sessions(callers, missing)
        works, served = [], []
        out: list[Any] = [None] * len(joined)
        for k, j in enumerate(joined):
            who = None if j.bearer is None else callers[j.bearer]
            if isinstance(who, str):
                out[k] = who
            else:
                works.append(j.work if who is None else j.work(who))
                served.append(k)
        for k, result in zip(served, serve(works) if works else [], strict=True):
            bearer = joined[k].bearer
            out[k] = result if bearer is None else (callers[bearer], result)
        return out

    def close(self) -> None:
        """Let the thread go (after the server stopped)."""
        self._queue.put(None)


class _Joined(NamedTuple):
    """A work queued for ``serve`` with the others of its batch (``StoreCalls.joined``)."""

    serve: Callable[[list[Any]], list[Any]]
    work: Any  # or, sent with ``bearer``: what makes the work for the runner it authenticates
    reads: bool
    bearer: str | None = None


_SESSIONS = object()  # the unit of a batch that reads the sessions of its works' tokens


class Unauthenticated(Exception):
    """A runner's session token authenticates no runner (``why``; see ``StoreCalls.as_runner``)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _settle(settled: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for done, (ok, value) in settled:
        if not done.done():
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)


class ApiContext(NamedTuple):
    """The parts every route module gets."""

    settings: Settings
    control: ControlService
    fleet: FleetService
    waker: Waker
    metrics: "Metrics"
    store_calls: StoreCalls


def token_of(request: Request) -> TokenRow:
    """The API token the gate authenticated this request with (403 for a runner's session)."""
    row = request.scope["state"].get("token")
    if row is None:
        raise HTTPException(403, "runner sessions may not use this endpoint")
    assert isinstance(row, TokenRow)
    return row


def require(request: Request, role: str) -> TokenRow:
    """The caller's token if its role includes ``role`` (403 otherwise; audited by the gate's
    refusals)."""
    row = token_of(request)
    if not auth.allows(row.role, role):
        refuse(request, f"the {row.role} {auth.ROLE_REFUSED} ({role} needed)", row.id)
    return row


def client_of(scope: Any) -> str:
    """The address of the request's client, as refusals record it."""
    return str((scope.get("client") or ("?",))[0])


def refuse(request: Request, why: str, token_id: str | None) -> NoReturn:
    """Audit (within the gate's budget) and answer 403 ``why`` (from a worker thread)."""
    request.app.state.refusals(request.url.path, why, client_of(request.scope), token_id)
    raise HTTPException(403, why)


async def record_refusal(ctx: "ApiContext", refusals: Any, scope: Any, why: str,
                         claimed: str | None) -> None:
    """Audit a refusal of the request of ``scope`` (within ``refusals``' budget, the gate's),
    from the event loop: the events are recorded on the store thread."""
    events = refusals.events(scope["path"], why, client_of(scope), claimed)
    if events:  # (counted here: a store call may run twice, see Store.batched)
        await ctx.store_calls(ctx.control.store.record, events)


async def refuse_async(ctx: "ApiContext", scope: Any, why: str, token_id: str | None
                       ) -> NoReturn:
    """:func:`refuse` on the event loop."""
    await record_refusal(ctx, scope["app"].state.refusals, scope, why, token_id)
    raise HTTPException(403, why)


async def authenticated(ctx: "ApiContext", bearer: str) -> Caller:
    """The runner whose session token is ``bearer``, its session read with the others of its
    batch (``StoreCalls.as_runner``, with no work; raises :class:`Unauthenticated`)."""
    caller, _ = await ctx.store_calls.as_runner(_no_work, bearer, _nothing)
    return caller


def _no_work(works: list[None]) -> list[None]:
    return works


def _nothing(caller: Caller) -> None:
    return None


def runner_of(request: Request) -> Caller:
    """The runner agent the gate authenticated this request as."""
    caller = request.scope["state"].get("runner")
    if not isinstance(caller, Caller):
        raise HTTPException(403, "only runner agents may use this endpoint")
    return caller


def needs(role: str) -> Any:
    """A route dependency: the caller's token must include ``role``; checked before the
    route's parameters and body are validated, so that a caller without the role learns
    nothing about them."""

    def check(request: Request) -> None:
        require(request, role)

    return Depends(check)
