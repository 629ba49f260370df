"""Collecting artifacts from a finished job's workspace: globs, no links, caps, sha256.

The runner (root) collects only after every process of the job is dead (``Sandbox.quiesce``),
so nothing can change the tree while it is read. Even so it never follows a path the job
chose: every directory and file is opened relative to the workspace's directory fd with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)``,
what was opened is checked with ``fstat``, and the opening is done with the file-system
identity (``setfsuid``) of the job's own uid, so a link that somehow got past all of that still
reads nothing the job could not read itself. Copies keep holes (a sparse file costs the host
no more than it cost the job); the stored copy, not the job's file, is what is scanned for
secrets. Everything is bounded: file count, sizes, entries walked, the number of refusals kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from stockade.api.protocol import ArtifactReport
from stockade.runner.globs import glob_match
from stockade.text import escape_controls

RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 1, 2, 4, 8
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
SYS_OPENAT2 = 437  # the same number on every architecture stockade supports
MAX_REFUSALS_KEPT = 100
CHUNK = 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int) -> int:
    """``openat2`` beneath ``dir_fd`` that never follows any link (OSError otherwise)."""
    how = _OpenHow(flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0, _RESOLVE)
    fd = int(_libc.syscall(SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how),
                           ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


@contextlib.contextmanager
def job_identity(uid: int | None) -> Iterator[None]:
    """File access as ``uid`` in this thread (``setfsuid``: root's file capabilities are
    dropped meanwhile); no change when ``uid`` is None."""
    if uid is None:
        yield
        return
    _libc.setfsgid(uid)
    _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(uid) != uid:  # setfsuid returns the previous fsuid: verify
            raise OSError(errno.EPERM, "cannot take the job's file-system identity")
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)


class Caps(NamedTuple):
    """The operator's bounds on one job's artifacts."""

    max_file: int
    max_total: int
    max_files: int = 10_000
    max_entries: int = 200_000  # directory entries walked
    deadline: float = math.inf  # time.monotonic() after which nothing more is collected


class Collected(NamedTuple):
    """What was stored, what was refused (with the reason), and which files leaked secrets."""

    stored: list[ArtifactReport]
    refused: list[str]
    leaks: list[tuple[str, list[str]]]  # (path, secret names)


@dataclass
class _Run:
    """The state of one collection."""

    dest: Path
    caps: Caps
    scan: Callable[[Path], tuple[set[str], str | None]] | None
    secret_names: Callable[[str], list[str]]
    show: Callable[[str], str]
    stored: list[ArtifactReport] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    leaks: list[tuple[str, list[str]]] = field(default_factory=list)
    refusals: int = 0
    total: int = 0
    # one scan per file, however many hard links name it: (st_dev, st_ino) -> its verdict
    verdicts: dict[tuple[int, int], tuple[set[str], str | None]] = field(default_factory=dict)

    def refuse(self, rel: str, why: str) -> None:
        self.refusals += 1
        if len(self.refused) < MAX_REFUSALS_KEPT:
            self.refused.append(f"{self.show(rel)}: {why}")

    def result(self) -> Collected:
        if self.refusals > len(self.refused):
            self.refused.append(f"... and {self.refusals - len(self.refused)} more refused")
        return Collected(self.stored, self.refused, self.leaks)


def collect(workspace: Path, patterns: tuple[str, ...], dest: Path, caps: Caps,
            scan: Callable[[Path], tuple[set[str], str | None]] | None = None,
            secret_names: Callable[[str], list[str]] = lambda _: [],
            show: Callable[[str], str] = lambda s: s, uid: int | None = None) -> Collected:
    """Copy the regular files of ``workspace`` matching ``patterns`` into ``dest``.

    ``scan(copy)`` returns the secrets found in a stored copy and why it could not be scanned
    (if so): such a file is withheld. ``secret_names(path)`` finds secrets in a file name,
    ``show(text)`` is how a job-chosen name may be printed (masked, control-escaped); ``uid``
    is the job's host uid whose identity the files are opened with."""
    if not patterns:
        return Collected([], [], [])
    run = _Run(dest, caps, scan, secret_names, show)
    with job_identity(uid):
        root = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for rel in _walk(root, run, uid):
            if not any(glob_match(p, rel) for p in patterns):
                continue
            fd = _open_file(root, rel, run, uid)
            if fd is not None:
                try:
                    _take(run, rel, fd)
                finally:
                    os.close(fd)
    finally:
        os.close(root)
    return run.result()


def _walk(root: int, run: _Run, uid: int | None) -> Iterator[str]:
    """The path of everything but directories below ``root``, in path order, never following
    a link; directories are opened one at a time (no recursion, few open fds)."""
    pending = [""]
    entries = 0
    while pending:
        rel_dir = pending.pop()
        try:
            with job_identity(uid):
                fd = openat2(root, rel_dir or ".", os.O_RDONLY | os.O_DIRECTORY)
            names = []
            with os.scandir(fd) as it:  # counted as read: a huge directory is never listed whole
                for e in it:
                    entries += 1
                    if entries > run.caps.max_entries:
                        break
                    names.append((e.name, e.is_dir(follow_symlinks=False)))
            os.close(fd)
        except OSError as e:
            run.refuse(rel_dir or ".", f"cannot be read ({e.strerror})")
            continue
        if entries > run.caps.max_entries:
            run.refuse(rel_dir or ".", f"more than {run.caps.max_entries} entries in the "
                       "workspace; the rest is not collected")
            return
        names.sort()
        subdirs = []
        for name, is_dir in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_dir:
                subdirs.append(rel)
                continue
            yield rel
        pending.extend(reversed(subdirs))


def _open_file(root: int, rel: str, run: _Run, uid: int | None) -> int | None:
    try:
        with job_identity(uid):
            fd = openat2(root, rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ELOOP:
            run.refuse(rel, "is a symlink; artifacts never follow links")
        elif e.errno not in (errno.ENXIO, errno.EACCES):  # sockets; unreadable is skipped
            run.refuse(rel, f"cannot be read ({e.strerror})")
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)  # FIFOs, devices: never artifacts
        return None
    return fd


def _take(run: _Run, rel: str, fd: int) -> None:
    caps = run.caps
    st = os.fstat(fd)
    size = st.st_size
    try:
        text_ok = rel.encode() and escape_controls(rel) == rel and "\t" not in rel
    except UnicodeEncodeError:
        return run.refuse(rel, "the file name is not valid UTF-8")
    if not text_ok:  # (a bidi override showed x\u202etxt.exe as xexe.txt in a download)
        return run.refuse(rel, "the file name contains control or bidi characters")
    if names := run.secret_names(rel):
        run.leaks.append((run.show(rel), names))
        return run.refuse(rel, f"withheld, its name contains the secret(s) {', '.join(names)}")
    if time.monotonic() > caps.deadline:
        return run.refuse(rel, "not collected: the job's time ran out while collecting")
    if len(run.stored) >= caps.max_files:
        return run.refuse(rel, f"more than {caps.max_files} artifacts (artifact_max_files)")
    if size > caps.max_file or run.total + size > caps.max_total:
        return run.refuse(rel, f"{size} bytes exceeds the artifact size cap")
    report = _copy(fd, run.dest, rel)
    if run.scan is not None:
        key = (st.st_dev, st.st_ino)
        if key not in run.verdicts:
            run.verdicts[key] = run.scan(run.dest / rel)
        found, unscannable = run.verdicts[key]
        if found or unscannable:
            (run.dest / rel).unlink()
            if found:
                run.leaks.append((run.show(rel), sorted(found)))
                return run.refuse(rel, "withheld, it contains the secret(s) "
                                  f"{', '.join(sorted(found))}")
            return run.refuse(rel, f"withheld, it cannot be scanned for secrets ({unscannable})")
    run.stored.append(report)
    run.total += size


def _copy(src: int, dest: Path, rel: str) -> ArtifactReport:
    """Copy the data of ``src`` to ``dest/rel`` keeping holes; its sha256 covers every byte."""
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    size = os.fstat(src).st_size
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600)
    try:
        pos = 0
        for start, end in _data_regions(src, size):
            _hash_zeros(digest, start - pos)
            os.lseek(src, start, os.SEEK_SET)
            os.lseek(out, start, os.SEEK_SET)
            left = end - start
            while left > 0:
                chunk = os.read(src, min(CHUNK, left))
                if not chunk:
                    break
                digest.update(chunk)
                os.write(out, chunk)
                left -= len(chunk)
            pos = end - left
        _hash_zeros(digest, size - pos)
        os.ftruncate(out, size)
    finally:
        os.close(out)
    return ArtifactReport(rel, digest.hexdigest(), size)


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the parts of the file that hold data (all of it if unknown)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            yield pos, size  # the file system cannot tell: copy everything
            return
        yield start, end
        pos = end


_ZEROS = bytes(CHUNK)


def _hash_zeros(digest: hashlib._Hash, n: int) -> None:
    while n > 0:
        take = min(n, CHUNK)
        digest.update(_ZEROS[:take])
        n -= take
