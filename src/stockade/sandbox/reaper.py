"""Reaping the runner's orphans: killed sandbox processes must not linger as zombies.

The runner makes itself a child subreaper, so a sandbox process whose parent died first is
re-parented to the runner rather than to the host's init (which may reap late or never).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterable

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Make orphaned descendants of this process its children (idempotent)."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _state(pid: int) -> str | None:
    """The process state letter (``Z`` for a zombie), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def reap(pids: Iterable[int], deadline: float, spare: Iterable[int] = ()) -> bool:
    """Wait until none of ``pids`` runs any more, reaping those that are our zombies.

    ``spare`` are children someone else waits for (a ``Popen``): they count as gone once
    they are zombies, and are left for their owner to reap."""
    pending, spared = set(pids), set(spare)
    while pending:
        for pid in list(pending):
            if pid in spared:
                if _state(pid) in (None, "Z"):
                    pending.discard(pid)
                continue
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    pending.discard(pid)
                    continue
            except ChildProcessError:
                pass
            if _state(pid) is None:
                pending.discard(pid)
        if pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
    return True
