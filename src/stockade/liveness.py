"""Whether the process that owns a job is still alive, known at once rather than at a timeout.

A runner holds an exclusive ``flock`` on ``$STOCKADE_HOME/runners/<runner id>.lock`` from before
it submits or claims a job until the job's result is committed. The kernel releases the lock
when the process dies, however it dies (SIGKILL, OOM, power loss of the process), so a lock that
can be taken belongs to a runner that is gone. A lock file is put in place only once it is
locked (created under a temporary name, locked, then renamed), so a checker never mistakes a
runner that is starting for a dead one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

_DIR = "runners"


def _path(home: Path, runner_id: str) -> Path:
    if "/" in runner_id or runner_id.startswith("."):
        raise ValueError(f"not a runner id: {runner_id!r}")
    return home / _DIR / f"{runner_id}.lock"


def hold(home: Path, runner_id: str) -> int:
    """Create and lock this runner's lock file; keep the returned fd open while the runner
    owns jobs (it is close-on-exec: no sandboxed process inherits it)."""
    directory = home / _DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    tmp = directory / f".{runner_id}.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, _path(home, runner_id))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def release(home: Path, runner_id: str, fd: int, recorded: bool) -> None:
    """Let the lock go. If the runner's jobs are all ``recorded``, its lock file is removed
    first; if not (an error kept a result from being committed), the file stays, free, so that
    the next command sees the runner gone and fails its job at once."""
    if recorded:
        with contextlib.suppress(OSError):
            os.unlink(_path(home, runner_id))
    os.close(fd)


def gone(home: Path, runner_id: str) -> bool | None:
    """True if the runner is provably dead (its lock can be taken), False if it is alive, None
    if it has no lock file here (another host's runner, or an older version's: only its lease
    can tell)."""
    return lock_is_free(_path(home, runner_id))


def lock_is_free(path: Path) -> bool | None:
    """Whether nobody holds the ``flock`` on ``path`` (taken and let go at once); None if
    there is no such file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def forget(home: Path, runner_id: str) -> None:
    """Remove a dead runner's lock file once its jobs are recorded as lost."""
    path = _path(home, runner_id)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except (BlockingIOError, FileNotFoundError):
        pass
    finally:
        os.close(fd)
