"""Finding and removing what a runner that died left behind: job directories, mounts, cgroups.

Each installation owns ``<runtime>/<installation id>/`` (created with a marker file naming the
installation) and the cgroups ``<cgroup_name>/<installation id>-<job>``; the reaper looks
nowhere else, and tears down only jobs its own database knows. A live runner holds an exclusive
``flock`` on ``<job dir>/.lock`` for the whole job; the kernel drops it when the runner dies,
however it dies. Anything of a job whose lock can be taken is therefore an orphan and is torn
down the way a normal teardown would.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from stockade.liveness import lock_is_free
from stockade.sandbox import mounts
from stockade.sandbox.cgroups import ROOT, JobCgroup

LOCK_NAME = ".lock"
MARKER_NAME = ".stockade-installation"
_JOB_DIR = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
_GRACE_S = 30.0  # a directory without a lock may be one being created right now


def mark(jobs_dir: Path, installation: str, home: Path) -> None:
    """Write the installation's marker into its runtime directory (once)."""
    if not marked(jobs_dir, installation):
        tmp = jobs_dir / f".{MARKER_NAME}.{os.getpid()}"
        tmp.write_text(f"{installation}\nstate {home}\n")
        os.replace(tmp, jobs_dir / MARKER_NAME)


def marked(jobs_dir: Path, installation: str) -> bool:
    """Whether ``jobs_dir`` carries this installation's marker (a regular file, not a link)."""
    try:
        fd = os.open(jobs_dir / MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.read(fd, 256).split(b"\n", 1)[0] == installation.encode()
    finally:
        os.close(fd)


def hold_lock(job_dir: Path) -> int:
    """Create and lock ``job_dir/.lock``; keep the returned fd open while the job lives."""
    fd = os.open(job_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _is_orphan(job_dir: Path) -> bool:
    free = lock_is_free(job_dir / LOCK_NAME)
    if free is not None:
        return free
    try:
        return time.time() - job_dir.stat().st_mtime > _GRACE_S
    except FileNotFoundError:
        return False


def _cgroup_names(parent: str) -> set[str]:
    names: set[str] = set()
    for base in (ROOT / "memory" / parent, ROOT / "pids" / parent, ROOT / parent):
        if base.is_dir():
            names.update(p.name for p in base.iterdir() if p.is_dir())
    return names


def reap_orphans(jobs_dir: Path, cgroup_parent: str, prefix: str,
                 ours: Callable[[str], bool]) -> list[str]:
    """Tear down every orphaned job of this installation (its runtime directory ``jobs_dir``,
    its cgroups named ``prefix + job``) that ``ours`` confirms; return their ids."""
    candidates = {p.name for p in jobs_dir.iterdir()
                  if p.is_dir() and _JOB_DIR.match(p.name) and not p.name.startswith("etc-")}
    candidates |= {name.removeprefix(prefix) for name in _cgroup_names(cgroup_parent)
                   if name.startswith(prefix)}
    reaped = []
    for name in sorted(candidates):
        job_dir = jobs_dir / name
        if (job_dir.is_dir() and not _is_orphan(job_dir)) or not ours(name):
            continue
        JobCgroup(prefix + name, cgroup_parent).remove()
        for point in reversed(mounts.mounts_under(job_dir)):
            try:
                mounts.unmount(Path(point))
            except OSError:
                continue
        shutil.rmtree(job_dir, ignore_errors=True)
        reaped.append(name)
    return reaped
