"""The cgroup migration warmer (sandbox/cgroups.py): it moves the runner into the cgroup it
is already in, so nothing changes for the runner, and it stops when told or when its budget
is spent, leaving no thread and no open file behind."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from stockade.sandbox.cgroups import ROOT, MigrationWarmer, _own_procs, layout

UNIFIED = ROOT / "unified"


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.005)
    return check()


def test_own_procs_names_the_cgroup_this_process_is_in() -> None:
    for root in (ROOT, UNIFIED):
        if layout(root) == "none":
            continue
        path = _own_procs(root)
        assert path is not None, root
        assert os.getpid() in [int(x) for x in path.read_text().split()], path


def test_no_hierarchy_no_thread(tmp_path: Path) -> None:
    warmer = MigrationWarmer(root=tmp_path)
    assert warmer.thread is None
    warmer.stop()


def test_the_warmer_moves_the_runner_nowhere_and_stops_when_told() -> None:
    before, fds = Path("/proc/self/cgroup").read_text(), _fds()
    warmer = MigrationWarmer(budget_s=30.0)
    assert warmer.thread is not None
    assert _wait_for(lambda: warmer.moves >= 3), "the warmer made no moves"
    warmer.stop()
    warmer.thread.join(timeout=10)
    assert not warmer.thread.is_alive()
    assert Path("/proc/self/cgroup").read_text() == before
    assert _fds() == fds


def test_the_warmer_ends_by_itself_when_its_budget_is_spent() -> None:
    fds = _fds()
    warmer = MigrationWarmer(budget_s=0.02)
    assert warmer.thread is not None
    warmer.thread.join(timeout=10)
    assert not warmer.thread.is_alive()
    assert warmer.moves >= 1
    assert _fds() == fds
