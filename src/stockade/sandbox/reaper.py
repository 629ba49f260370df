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


def reap(pids: Iterable[int], deadline: float) -> bool:
    """Wait until none of ``pids`` exists, reaping those that are our zombies."""
    pending = set(pids)
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    pending.discard(pid)
                    continue
            except ChildProcessError:
                pass
            if not os.path.exists(f"/proc/{pid}"):
                pending.discard(pid)
        if pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
    return True
