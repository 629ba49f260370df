"""The cgroup migration warmer (sandbox/cgroups.py): it moves the runner into the cgroup it
is already in, so nothing changes for the runner; it never writes a cgroup the runner is not
listed in, stops for good when the runner is moved, ends when the last hold is released or
its budget is spent, and leaves no thread and no open file behind. One per backend: hints and
holds of many jobs at once share one thread."""

from __future__ import annotations

import os
import threading
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


def _warmers() -> int:
    return sum(t.name == "cgroup-warmer" for t in threading.enumerate())


def test_own_procs_names_the_cgroup_this_process_is_in() -> None:
    mine = Path("/proc/self/cgroup").read_text()
    for root in (ROOT, UNIFIED):
        if layout(root) == "none":
            continue
        path = _own_procs(root, mine)
        assert path is not None, root
        assert os.getpid() in [int(x) for x in path.read_text().split()], path
    assert _own_procs(ROOT, "8:pids:/../x\n0::/../x\n") is None


def test_no_hierarchy_no_moves(tmp_path: Path) -> None:
    warmer = MigrationWarmer(root=tmp_path)
    warmer.hint()
    assert _wait_for(lambda: not warmer.running())
    assert warmer.broken and warmer.moves == 0
    warmer.hint()  # broken for good: no thread again
    assert not warmer.running()


def test_a_cgroup_the_runner_is_not_in_is_never_written(tmp_path: Path) -> None:
    """As in a cgroup namespace whose /proc/self/cgroup path names another cgroup of the
    mounted tree: the file it would write does not list the runner."""
    kind = layout(ROOT)
    base = tmp_path / ("pids" if kind == "v1" else "")
    base.mkdir(parents=True, exist_ok=True)
    for name in ("memory", "pids", "cpu"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "cgroup.procs").write_text("1\n")
    if kind == "v2":
        (tmp_path / "cgroup.controllers").write_text("memory pids cpu\n")
    (base / "cgroup.procs").write_text("1\n2\n")
    warmer = MigrationWarmer(root=tmp_path)
    warmer.hold()
    assert _wait_for(lambda: not warmer.running())
    assert warmer.broken and warmer.moves == 0
    assert (base / "cgroup.procs").read_text() == "1\n2\n"


def test_the_warmer_moves_the_runner_nowhere_and_stops_at_the_last_release() -> None:
    assert _wait_for(lambda: _warmers() == 0)  # (another test's, closing its file)
    before, fds = Path("/proc/self/cgroup").read_text(), _fds()
    warmer = MigrationWarmer(budget_s=30.0)
    warmer.hold()
    warmer.hold()  # two jobs being set up at once: one thread
    warmer.hint()
    assert _wait_for(lambda: warmer.moves >= 3), "the warmer made no moves"
    assert _warmers() == 1
    warmer.release()
    time.sleep(3 * MigrationWarmer.INTERVAL_S)
    assert warmer.running()  # the other job still holds it
    warmer.release()
    assert _wait_for(lambda: not warmer.running())
    assert _wait_for(lambda: _warmers() == 0)
    assert not warmer.broken
    assert Path("/proc/self/cgroup").read_text() == before
    assert _fds() == fds
    moves = warmer.moves
    warmer.hint()  # and again for the next job
    assert _wait_for(lambda: warmer.moves > moves)
    warmer.release()


def test_the_warmer_ends_by_itself_when_its_budget_is_spent() -> None:
    assert _wait_for(lambda: _warmers() == 0)  # (another test's, closing its file)
    fds = _fds()
    warmer = MigrationWarmer(budget_s=0.03)
    warmer.hold()  # never released (a job that failed in a way nobody let it go)
    assert _wait_for(lambda: not warmer.running())
    assert warmer.moves >= 1 and not warmer.broken
    assert _wait_for(lambda: _fds() == fds)
