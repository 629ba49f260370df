"""StoreCalls (api/common.py): works for one ``serve`` queued together are served in one call
of it, in one batch with the plain calls; when that call fails, each work runs alone, and
only the one that fails alone gets the error. On a real SQLite store."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from stockade.api.common import StoreCalls
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

    calls = StoreCalls(store)

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
