"""What the API's route modules share: the server's parts, the caller of a request, and the
waker that ends runners' long polls when work arrives.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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

    async def wait(self, timeout: float) -> None:
        """Until a :meth:`notify` picks this poll, or ``timeout`` seconds."""
        self._loop = loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        self._waiting.append(woken)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken, timeout)
        finally:
            if not woken.done():
                woken.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(woken)

    def notify(self) -> None:
        """Wake the longest-waiting poll (thread-safe)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_one)

    def _wake_one(self) -> None:
        while self._waiting:
            woken = self._waiting.popleft()
            if not woken.done():
                woken.set_result(None)
                return


T = TypeVar("T")


class StoreCalls:
    """How the async routes call the store: in threads of our own, as many as the store can
    use at once (SQLite: one, its calls run one at a time anyway; PostgreSQL: its pool's
    connections), cheaper than the framework's default pool of forty. Never in the event
    loop's own thread, however short a call usually is: a SQLite write waits for another
    process's (up to its busy timeout), and every other request would wait with it."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max(1, threads), "store")

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a store thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Let the threads go (after the server stopped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


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
        refuse(request, f"the {row.role} role may not do this ({role} needed)", row.id)
    return row


def refuse(request: Request, why: str, token_id: str | None) -> NoReturn:
    """Audit (within the gate's budget) and answer 403 ``why``."""
    refusals = request.app.state.refusals
    client = (request.scope.get("client") or ("?",))[0]
    refusals(request.url.path, why, str(client), token_id)
    raise HTTPException(403, why)


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
