"""The pool of host uids: each concurrently running job gets one of its own.

Per-uid kernel limits (inotify instances, mqueue bytes, pipe pages, ``RLIMIT_NPROC``) and
``/proc/PID/environ`` access are per host uid: two jobs sharing one would couple. A job's uid
(its gid is the same number) is taken from the operator's range (``uid_pool``, e.g.
``1600000-1601023``: no account needs to exist) by locking ``LOCK_DIR/<uid>`` with ``flock``.
The lock directory is host-wide, so every stockade installation on the host shares the pool
safely; the kernel drops a lock when its holder dies, however it dies. A uid whose lock is free
is still skipped while any process of that uid is alive (a previous owner's leftovers).
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from stockade.errors import ConfigError, SandboxError

LOCK_DIR = Path("/run/lock/stockade-uids")
MIN_UID = 65536  # never an ordinary account's or a distribution's system uid


def parse_range(text: str) -> range:
    """``FIRST-LAST`` (inclusive) as a range; ConfigError if it is not a safe range."""
    first, sep, last = text.partition("-")
    try:
        lo, hi = int(first), int(last) if sep else int(first)
    except ValueError:
        raise ConfigError(f"uid_pool {text!r} is not a range of uids",
                          hint="write FIRST-LAST, e.g. 1600000-1601023") from None
    if lo < MIN_UID or hi < lo or hi >= 2**32 - 2:
        raise ConfigError(f"uid_pool {text!r} must lie within {MIN_UID}-4294967293 and "
                          "hold at least one uid", hint="e.g. 1600000-1601023")
    return range(lo, hi + 1)


class UidLease:
    """One job's host uid (its gid is the same number), held until :meth:`release`."""

    __slots__ = ("_fd", "uid")

    def __init__(self, uid: int, fd: int | None) -> None:
        self.uid = uid
        self._fd = fd

    def release(self) -> None:
        """Give the uid back to the pool (only once nothing of the job is left)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock_dir() -> int:
    """The host-wide lock directory, created root-only; refused if anyone else could write."""
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise SandboxError(f"{LOCK_DIR} must be owned by root and writable by root only",
                           hint=f"rm -r {LOCK_DIR} (stockade recreates it)")
    return fd


def _uids_in_use() -> set[int]:
    """The owners of the host's processes (``/proc/PID`` is owned by the process's euid)."""
    owners = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                owners.add(entry.stat(follow_symlinks=False).st_uid)
            except OSError:
                continue
    return owners


def allocate(pool: range) -> UidLease:
    """Lock a free uid of ``pool`` for one job; SandboxError if every uid is taken."""
    dir_fd = _lock_dir()
    busy: set[int] | None = None
    try:
        # spread concurrent allocators over the range
        start = int.from_bytes(os.urandom(4), "big") % len(pool)
        for i in range(len(pool)):
            uid = pool[(start + i) % len(pool)]
            fd = os.open(str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if busy is None:
                busy = _uids_in_use()
            if uid in busy:  # a previous owner's process is still alive: not reusable yet
                os.close(fd)
                continue
            return UidLease(uid, fd)
    finally:
        os.close(dir_fd)
    raise SandboxError(f"every uid of the pool ({pool.start}-{pool.stop - 1}) is in use",
                       hint="run fewer jobs at once or widen uid_pool")
