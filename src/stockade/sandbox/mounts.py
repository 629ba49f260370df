"""The few mount operations the runner performs on the host: a size-limited tmpfs per job, and
a read-only view of an image's tree inside the job's directory."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_PRIVATE = 1 << 18
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_tmpfs(target: Path, size: int, uid: int, gid: int) -> None:
    """Mount a private, nosuid, nodev tmpfs of ``size`` bytes owned by ``uid`` on ``target``."""
    opts = f"size={size},mode=0700,uid={uid},gid={gid},nr_inodes=1m".encode()
    _check(_libc.mount(b"tmpfs", bytes(target), b"tmpfs", MS_NOSUID | MS_NODEV, opts),
           f"mount tmpfs on {target}")
    _check(_libc.mount(None, bytes(target), None, MS_PRIVATE, None), f"make {target} private")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind ``source`` on ``target`` read-only, nosuid, nodev, private (the job's bwrap, which
    runs as the job's uid, reaches a root-only tree through it)."""
    _check(_libc.mount(bytes(source), bytes(target), None, MS_BIND, None),
           f"bind {source} on {target}")
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        _check(_libc.mount(None, bytes(target), None, flags, None),
               f"make {target} read-only")
        _check(_libc.mount(None, bytes(target), None, MS_PRIVATE, None),
               f"make {target} private")
    except OSError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Unmount ``target`` (not following symlinks)."""
    _check(_libc.umount2(bytes(target), UMOUNT_NOFOLLOW), f"unmount {target}")


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix`` in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(prefix) or point.startswith(f"{prefix}/"):
                found.append(point)
    return found
