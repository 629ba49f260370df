"""Finding and removing what a runner that died left behind: job directories, mounts, cgroups.

Each installation owns ``<runtime>/<installation id>/`` (created with a marker file naming the
installation) and the cgroups ``<cgroup_name>/<installation id>-<job>``; the reaper looks
nowhere else, and tears down only jobs its own database knows. A live runner holds an exclusive
``flock`` on ``<job dir>/.lock`` for the whole job; the kernel drops it when the runner dies,
however it dies. A job directory gets its name only once its lock is held (it is made and locked
as ``.new-<job>`` and renamed), so anything of a job whose lock can be taken, or that has none,
is an orphan and is torn down the way a normal teardown would.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from stockade.liveness import lock_is_free
from stockade.sandbox import mounts
from stockade.sandbox.cgroups import ROOT, JobCgroup

LOCK_NAME = ".lock"
MARKER_NAME = ".stockade-installation"
_JOB_DIR = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
_STAGING = ".new-"


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


def create_locked(job_dir: Path, gid: int) -> int:
    """Create ``job_dir`` (mode 0710, group ``gid``) already holding its lock; keep the
    returned fd open while the job lives. The directory appears under its name locked, so a
    reaper never mistakes one being created for an orphan."""
    if job_dir.exists():
        raise FileExistsError(f"{job_dir} exists")
    staging = job_dir.with_name(_STAGING + job_dir.name)
    staging.mkdir(mode=0o710)
    try:
        os.chown(staging, 0, gid)
        fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, job_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return fd


def _is_orphan(job_dir: Path) -> bool:
    return lock_is_free(job_dir / LOCK_NAME) is not False  # free, or never locked


def _cgroup_names(parent: str, prefix: str) -> set[str]:
    """Children of ``parent`` named ``prefix...`` in any hierarchy (an OCI runtime makes them
    in all of them). Read with ``scandir`` (no stat of each of the parent's control files)."""
    names: set[str] = set()
    with os.scandir(ROOT) as hierarchies:
        bases = [os.path.join(h.path, parent) for h in hierarchies
                 if h.is_dir(follow_symlinks=False)]
    for base in (*bases, os.path.join(ROOT, parent)):
        try:
            if not stat.S_ISDIR(os.lstat(base).st_mode):
                continue
            with os.scandir(base) as children:
                names.update(c.name for c in children
                             if c.name.startswith(prefix) and c.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
    return names


def reap_orphans(jobs_dir: Path, cgroup_parent: str, prefix: str,
                 ours: Callable[[str], bool]) -> list[str]:
    """Tear down every orphaned job of this installation (its runtime directory ``jobs_dir``,
    its cgroups named ``prefix + job``) that ``ours`` confirms; return their ids."""
    with os.scandir(jobs_dir) as entries:
        dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    for name in dirs:
        if name.startswith(_STAGING) and _is_orphan(jobs_dir / name):  # its creator died
            shutil.rmtree(jobs_dir / name, ignore_errors=True)  # before the rename
    candidates = {name for name in dirs if _JOB_DIR.match(name) and not name.startswith("etc-")}
    candidates |= {name.removeprefix(prefix) for name in _cgroup_names(cgroup_parent, prefix)}
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
