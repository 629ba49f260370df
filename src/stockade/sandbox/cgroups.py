"""Per-job cgroups on cgroup v2 and on the v1/hybrid layout: limits, OOM count, kill, removal.

The runner (root) creates ``<root>/<controller>/stockade/<job>`` (v1) or
``<root>/stockade/<job>`` (v2), writes the limits, and opens each ``cgroup.procs`` for writing.
The sandbox launcher, already running as the job's unprivileged host uid, writes ``0`` to those
open files to enter the cgroup before it executes bwrap: the kernel checks the credentials of
whoever opened the file, so the job's processes never need write access to any cgroup file.

An OCI runtime puts each step's container in a child of the job's cgroup (``step_path``) and
makes that child in every hierarchy it knows (``cpuset``, ``devices``, the named ``systemd``
one ...): reading, killing and removing therefore cover the job's whole subtree, in every
hierarchy, so that nothing a runtime made survives the job.
"""

import contextlib
import errno
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

from stockade.errors import SandboxError
from stockade.sandbox.reaper import reap

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


class Limits(NamedTuple):
    """What a job's cgroup enforces."""

    memory_bytes: int
    pids: int
    cpus: float


def layout(root: Path = ROOT) -> str:
    """``v2`` (unified), ``v1`` (legacy or hybrid with v1 controllers) or ``none``."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if all((root / c / "cgroup.procs").exists() for c in ("memory", "pids", "cpu")):
        return "v1"
    return "none"


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def _subtree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, deepest first (the order they can be removed in)."""
    found, todo = [], [top]
    while todo:
        d = todo.pop()
        try:
            children = [Path(e.path) for e in os.scandir(d)
                        if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.append(d)
        todo += children
    return found[::-1]


def _rmdir(path: Path, deadline: float) -> None:
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class MigrationWarmer:
    """Keeps the kernel ready for a quick move into a cgroup while jobs are set up.

    A process's first move between cgroups after a quiet while waits for an RCU grace period
    (the kernel's lock on every process's cgroup membership switches to its writer mode: 6-11
    ms on a cgroup-v1 host), and a step's launcher makes that move just before it executes the
    sandbox. The lock stays in writer mode for about one more grace period after a move: while
    a job is coming (:meth:`hint`) or being set up (:meth:`hold` until :meth:`release`), one
    thread moves the runner into the cgroup it is already in (no change) every few
    milliseconds, so that the wait passes while the sandbox is prepared instead of in the
    launcher. Each hint or hold lasts at most ``budget_s``; the last release ends it.

    Only an optimisation, and careful about it: it runs only if the runner is listed in the
    ``cgroup.procs`` file it would write (in a cgroup namespace the path in /proc/self/cgroup
    may name another cgroup of the mounted tree), it ends as soon as the runner's cgroups
    change (an operator moved it), and any error ends it for good, quietly: a launcher then
    waits as it would have. One per backend (process)."""

    INTERVAL_S = 0.004  # the lock stays in writer mode for ~10 ms after a move

    def __init__(self, root: Path = ROOT, budget_s: float = 0.1) -> None:
        self._root, self._budget = root, budget_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._holds, self._until = 0, 0.0
        self._thread: threading.Thread | None = None
        self.broken = False  # an error ended it: never again in this process
        self.moves = 0  # no-op moves made so far

    def hint(self) -> None:
        """A job is coming: warm for up to ``budget_s``."""
        with self._lock:
            self._start()

    def hold(self) -> None:
        """A job is being set up: warm until :meth:`release` (at most ``budget_s``)."""
        with self._lock:
            self._holds += 1
            self._start()

    def release(self) -> None:
        """A job held since :meth:`hold` started its first step; the last one stops it."""
        with self._lock:
            self._holds = max(0, self._holds - 1)
            if self._holds == 0:
                self._until = 0.0
                self._wake.set()

    def _start(self) -> None:
        if self.broken:
            return
        self._until = time.monotonic() + self._budget
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cgroup-warmer",
                                            daemon=True)
            self._thread.start()

    def running(self) -> bool:
        """Whether its thread is warming now."""
        with self._lock:
            return self._thread is not None

    def _run(self) -> None:
        fd = None
        try:
            mine = Path("/proc/self/cgroup").read_text()
            path = _own_procs(self._root, mine)
            if path is None or os.getpid() not in _read_procs(path):
                raise OSError("not the runner's own cgroup")
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            while True:
                with self._lock:
                    if time.monotonic() >= self._until:
                        self._thread = None
                        return
                    self._wake.clear()
                if Path("/proc/self/cgroup").read_text() != mine:
                    raise OSError("the runner was moved")
                os.write(fd, b"0")
                self.moves += 1
                self._wake.wait(self.INTERVAL_S)
        except (OSError, ValueError):
            with self._lock:
                self.broken, self._thread = True, None
        finally:
            if fd is not None:
                os.close(fd)


def _own_procs(root: Path, cgroups: str) -> Path | None:
    """The ``cgroup.procs`` file of the cgroup this process is in according to ``cgroups``
    (/proc/self/cgroup): in the ``pids`` hierarchy on v1, the unified one on v2 (None if
    neither is found)."""
    kind = layout(root)
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if kind == "v1" and "pids" in controllers.split(","):
            base = root / "pids"
        elif kind == "v2" and controllers == "":
            base = root
        else:
            continue
        if not path.startswith("/") or ".." in path.split("/"):
            return None
        return base / path.lstrip("/") / "cgroup.procs"
    return None


class JobCgroup:
    """The cgroup(s) of one job; call :meth:`remove` when the job is over."""

    def __init__(self, name: str, parent: str, root: Path = ROOT) -> None:
        self.layout = layout(root)
        if self.layout == "none":
            raise SandboxError(
                "no usable cgroup hierarchy: memory, pids and cpu controllers are missing",
                hint="mount cgroup v2 at /sys/fs/cgroup or the v1 controllers under it",
            )
        self.root = root
        if self.layout == "v1":
            self.dirs = {c: root / c / parent / name for c in V1_CONTROLLERS if (root / c).is_dir()}
        else:
            self.dirs = {"unified": root / parent / name}
        self.parent = parent
        self._procs_fds: list[int] = []

    @property
    def _main(self) -> Path:
        return self.dirs["memory" if self.layout == "v1" else "unified"]

    def create(self, limits: Limits) -> None:
        """Make the directories, write the limits and open the ``cgroup.procs`` files."""
        try:
            if self.layout == "v2":
                self._enable_v2_controllers()
            for d in self.dirs.values():
                d.parent.mkdir(exist_ok=True)
                d.mkdir()
            self._write_limits(limits)
            self._procs_fds = [os.open(d / "cgroup.procs", os.O_WRONLY) for d in self.dirs.values()]
        except OSError as e:
            self.remove()
            raise SandboxError(
                f"cannot set up the job cgroup {self._main}: {e.strerror}",
                hint="run stockade as root on a host with the memory, pids and cpu controllers",
            ) from e

    def _enable_v2_controllers(self) -> None:
        wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        _write(self.root / "cgroup.subtree_control", wanted)
        parent = self.root / self.parent
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", wanted)

    def _write_limits(self, limits: Limits) -> None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if self.layout == "v1":
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _write(self.dirs["pids"] / "pids.max", str(limits.pids))
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        else:
            d = self.dirs["unified"]
            _write(d / "memory.max", str(limits.memory_bytes))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids))
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")

    def procs_fds(self) -> list[int]:
        """Open ``cgroup.procs`` files; writing ``0`` to each moves the writer into the job."""
        return list(self._procs_fds)

    def step_path(self, step: str) -> str:
        """The path (from the hierarchy's root) of a child cgroup for one step's container,
        as an OCI runtime's ``cgroupsPath`` names it."""
        return f"/{self.parent}/{self._main.name}/{step}"

    def pids(self) -> list[int]:
        """The processes currently in the job's cgroup and its children."""
        return [pid for d in _subtree(self._main) for pid in _read_procs(d / "cgroup.procs")]

    def oom_kills(self) -> int:
        """How many processes of the job the kernel's OOM killer has killed so far (v1
        counts a kill in the victim's own cgroup only: its children's are added up)."""
        if self.layout == "v1":
            return sum(_oom_kill_count(d / "memory.oom_control") for d in _subtree(self._main))
        return _oom_kill_count(self._main / "memory.events")

    def memory_peak(self) -> int:
        """The job's peak memory use in bytes (0 if the kernel does not report it)."""
        name = "memory.max_usage_in_bytes" if self.layout == "v1" else "memory.peak"
        try:
            return int((self._main / name).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def kill_all(self, timeout: float = 5.0, spare: tuple[int, ...] = ()) -> bool:
        """SIGKILL every process of the job; True once the cgroup is empty and all are reaped.

        Killed processes whose parent died first are re-parented to the runner (a child
        subreaper, see ``reaper.py``), which reaps them here so that none lingers as a zombie;
        ``spare`` are the runner's own children that their ``Popen`` will reap.
        """
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while pids := self.pids():
            seen.update(pids)
            if time.monotonic() > deadline:
                return False
            if (self._main / "cgroup.kill").exists():  # cgroup v2 on Linux 5.14 and newer
                _write(self._main / "cgroup.kill", "1")
            else:
                self._freeze_and_kill()
            time.sleep(0.002)
        return reap(seen, deadline, spare)

    def _freeze_and_kill(self) -> None:
        """Freeze the job (frozen processes cannot fork), SIGKILL each process, thaw."""
        if self.layout == "v1":
            state, frozen, thawed = "freezer.state", "FROZEN", "THAWED"
            freezer = self.dirs.get("freezer")
        else:
            state, frozen, thawed = "cgroup.freeze", "1", "0"
            freezer = self._main
        if freezer and not (freezer / state).exists():
            freezer = None
        if freezer:
            _write(freezer / state, frozen)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if freezer:
            _write(freezer / state, thawed)

    def remove(self) -> list[str]:
        """Close the open files, kill what is left and remove the directories (with their
        children, in every hierarchy); return leftovers."""
        for fd in self._procs_fds:
            os.close(fd)
        self._procs_fds = []
        leftovers = []
        try:
            if self._main.exists() and not self.kill_all():
                leftovers.append(f"processes still in {self._main}: {self.pids()}")
        except OSError as e:
            leftovers.append(f"cannot kill the processes in {self._main}: {e.strerror}")
        deadline = time.monotonic() + 5
        for top in self._all_dirs():
            for d in _subtree(top):
                try:
                    _rmdir(d, deadline)
                except OSError as e:
                    leftovers.append(f"cgroup {d} not removed: {e.strerror}")
        return leftovers

    def _all_dirs(self) -> list[Path]:
        """The job's directory in each hierarchy: ours, and those a runtime made."""
        name = self._main.name
        found = {*self.dirs.values(), self.root / self.parent / name}
        with contextlib.suppress(OSError):
            found |= {Path(e.path) / self.parent / name for e in os.scandir(self.root)
                      if e.is_dir(follow_symlinks=False)}
        return sorted(d for d in found if d.is_dir())


def _oom_kill_count(path: Path) -> int:
    """The ``oom_kill`` line of ``memory.oom_control`` (v1) or ``memory.events`` (v2)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except FileNotFoundError:
        pass
    return 0
