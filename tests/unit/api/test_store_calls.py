"""StoreCalls (api/common.py): works for one ``serve`` queued together are served in one call
of it, in one batch with the plain calls; when that call fails, each work runs alone, and
only the one that fails alone gets the error. Works sent with a session token are
authenticated in their batch, all with one read. On a real SQLite store."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from stockade.api.common import StoreCalls, Unauthenticated
from stockade.audit import AuditEvent
from stockade.store.open import open_store


def test_joined_works_are_served_together_and_alone_when_together_fails(
        tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    seen: list[list[int]] = []
    release = threading.Event()

    def serve(works: list[int]) -> list[int]:
        seen.append(list(works))
        if 13 in works:
            raise ValueError("thirteen")
        store.record([AuditEvent("test", f"served:{w}", 1.0) for w in works])
        return [w * 10 for w in works]

    def careless(works: list[int]) -> list[int]:  # writes, then fails
        seen.append(list(works))
        store.record([AuditEvent("test", f"careless:{w}", 1.0) for w in works])
        if 13 in works:
            raise ValueError("thirteen")
        return works

    def plain(name: str) -> str:
        store.record([AuditEvent("test", name, 1.0)])
        return name

    def blocker() -> str:
        release.wait(5)
        return "blocked"

    calls = StoreCalls(store, _no_sessions)

    async def main() -> list[object]:
        first = asyncio.ensure_future(calls(blocker))  # the thread is busy: the rest queue
        await asyncio.sleep(0.05)
        rest: list[Any] = [asyncio.ensure_future(calls.joined(serve, w)) for w in (1, 2, 3)]
        rest.append(asyncio.ensure_future(calls(plain, "plain")))
        await asyncio.sleep(0.05)
        release.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        release.clear()
        bad: list[Any] = [asyncio.ensure_future(calls(blocker))]
        await asyncio.sleep(0.05)
        bad += [asyncio.ensure_future(calls.joined(serve, w)) for w in (4, 13, 5)]
        bad.append(asyncio.ensure_future(calls(plain, "plain again")))
        await asyncio.sleep(0.05)
        release.set()
        out += await asyncio.gather(*bad, return_exceptions=True)
        release.clear()
        lone: list[Any] = [asyncio.ensure_future(calls(blocker))]
        await asyncio.sleep(0.05)
        lone += [asyncio.ensure_future(calls.joined(careless, w)) for w in (6, 13)]
        await asyncio.sleep(0.05)
        release.set()
        return [*out, *await asyncio.gather(*lone, return_exceptions=True)]

    try:
        out = asyncio.run(main())
    finally:
        calls.close()
    assert out[:5] == ["blocked", 10, 20, 30, "plain"]
    assert out[5:7] == ["blocked", 40] and isinstance(out[7], ValueError)
    assert out[8:10] == [50, "plain again"]
    # a group alone (no other call in its batch) is one transaction too: undone whole
    assert out[10:12] == ["blocked", 6] and isinstance(out[12], ValueError)
    assert seen[0] == [1, 2, 3]  # one call for the three
    assert [4, 13, 5] in seen and [13] in seen and [4] in seen and [5] in seen
    # the batch the failed call spoiled was undone and run again: each event once
    actions = [e.action for e, _, _ in store.audit_records()]
    assert sorted(actions) == sorted(["plain", "plain again", "careless:6",
                                      *(f"served:{w}" for w in (1, 2, 3, 4, 5))])
    store.close()


class _Runner(NamedTuple):
    """A runner a session token authenticates (here: a token that starts with "ok")."""

    token: str


def _no_sessions(bearers: list[str]) -> list[Any]:
    raise AssertionError("no work was sent with a session token")


def test_works_sent_with_a_session_token_are_authenticated_in_their_batch(
        tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    reads: list[list[str]] = []
    seen: list[list[Any]] = []
    release = threading.Event()

    def authenticate(bearers: list[str]) -> list[Any]:
        reads.append(list(bearers))
        if "broken" in bearers:
            raise ValueError("the read failed")
        return [_Runner(b) if b.startswith("ok") else f"unknown {b}" for b in bearers]

    def serve(works: list[Any]) -> list[Any]:
        seen.append(list(works))
        if any(w[1] == 13 for w in works):
            raise ValueError("thirteen")
        store.record([AuditEvent("test", f"served:{w}", 1.0) for w in works])
        return [f"{w}!" for w in works]

    def blocker() -> str:
        release.wait(5)
        return "blocked"

    calls = StoreCalls(store, authenticate)

    def work(n: int) -> Any:
        return lambda caller: (caller, n)

    async def batch(*sent: tuple[str | None, int]) -> list[Any]:
        first = asyncio.ensure_future(calls(blocker))  # the thread is busy: the rest queue
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(calls.joined(serve, ("gate", n)) if bearer is None
                                      else calls.as_runner(serve, bearer, work(n)))
                for bearer, n in sent]
        await asyncio.sleep(0.05)
        release.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        release.clear()
        return out[1:]

    try:
        out = asyncio.run(batch(("ok1", 1), (None, 2), ("bad", 3), ("ok1", 4), ("ok2", 5)))
        one, two = _Runner("ok1"), _Runner("ok2")
        assert out[0] == (one, f"{(one, 1)}!") and out[1] == "('gate', 2)!"
        assert isinstance(out[2], Unauthenticated) and out[2].why == "unknown bad"
        assert out[3] == (one, f"{(one, 4)}!") and out[4] == (two, f"{(two, 5)}!")
        assert reads == [["bad", "ok1", "ok2"]]  # one read for the batch, before its serve
        assert seen == [[(one, 1), ("gate", 2), (one, 4), (two, 5)]]  # refused: not served
        reads.clear()
        seen.clear()
        # together they fail: each alone, with the sessions the batch read
        out = asyncio.run(batch(("ok1", 6), ("ok13", 13)))
        assert out[0] == (one, f"{(one, 6)}!") and isinstance(out[1], ValueError)
        assert reads and all(r == ["ok1", "ok13"] for r in reads)  # (the batch ran again)
        assert [(one, 6)] in seen and [(_Runner("ok13"), 13)] in seen
        reads.clear()
        # the batch's read fails: the read runs alone, then the serve reads for itself
        out = asyncio.run(batch(("broken", 7), ("ok3", 8)))
        three = _Runner("ok3")
        assert isinstance(out[0], ValueError) and out[1] == (three, f"{(three, 8)}!")
        with pytest.raises(Unauthenticated):
            asyncio.run(calls.as_runner(serve, "nope", work(9)))
    finally:
        calls.close()
    actions = [e.action for e, _, _ in store.audit_records()]
    assert f"served:{(_Runner('ok1'), 6)}" in actions and not any("13" in a for a in actions)
    store.close()
