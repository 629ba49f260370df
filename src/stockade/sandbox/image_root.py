"""The root of a job that runs on an image: the image's own tree, read-only, with an ``/etc``
of stockade's making.

bwrap's root stays its own tmpfs (read-only once set up); each top-level entry of the image's
tree is bound onto it (a symbolic link is recreated as a link, never followed on the host),
except the places stockade mounts itself (``/etc``, ``/proc``, ``/dev``, ``/sys``, ``/tmp``,
``/run``, ``/workspace``). The image's ``/etc`` is copied once per image into the runner's
runtime directory (``etc-img-<chain id>``) without following any link (links are copied as
links: they resolve inside the sandbox), and then made ours: the job user is added to
``passwd`` and ``group`` (an image user with the same name or id is dropped), ``hosts`` is
localhost only, ``resolv.conf`` empty (no DNS inside), ``nsswitch.conf`` files only, and
``shadow``, ``gshadow`` and their backups are left out. The image's CA certificates, its
``ld.so.cache`` and everything else stay as the image has them.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from stockade.errors import SandboxError
from stockade.sandbox.rootfs import JOB_GID, JOB_HOME, JOB_UID, JOB_USER

OURS = frozenset({"etc", "proc", "dev", "sys", "tmp", "run", "workspace"})
LEFT_OUT = frozenset({"shadow", "gshadow", "shadow-", "gshadow-", "passwd-", "group-"})
MAX_ETC_BYTES = 64 * 1024 * 1024
MAX_ETC_ENTRIES = 20_000
MAX_ACCOUNTS_BYTES = 1024 * 1024
_FILES = {
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "resolv.conf": "",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
}


class Entry(NamedTuple):
    """A top-level entry of an image's tree: a directory, a file, or a symbolic link (its
    target, recreated as a link: never followed on the host)."""

    name: str
    is_dir: bool
    link: str | None = None


def top_entries(tree: Path) -> list[Entry]:
    """The image's top-level entries a job's root shows (see the module docstring)."""
    found: list[Entry] = []
    for entry in sorted(os.scandir(tree), key=lambda e: e.name):
        if entry.name in OURS:
            continue
        if entry.is_symlink():
            found.append(Entry(entry.name, False, os.readlink(entry.path)))
        elif entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
            found.append(Entry(entry.name, entry.is_dir(follow_symlinks=False)))
    return found


def root_options(tree: Path, seen_at: Path) -> list[str]:
    """bwrap options binding the image's top-level entries (see the module docstring); the
    tree is read on the host at ``tree``, and bwrap (the job's uid) reaches it at ``seen_at``
    (a read-only bind of it in the job's directory)."""
    options: list[str] = []
    for entry in top_entries(tree):
        if entry.link is not None:
            options += ["--symlink", entry.link, f"/{entry.name}"]
        else:
            options += ["--ro-bind", str(seen_at / entry.name), f"/{entry.name}"]
    return options


def has(tree: Path, path: str) -> bool:
    """Whether ``path`` (absolute in the image) names something, following the image's own
    links inside the tree only (a link out of the tree counts as missing)."""
    current, hops = tree, 0
    parts = [p for p in path.split("/") if p]
    while parts:
        part = parts.pop(0)
        if part in (".", ".."):
            return False
        candidate = current / part
        try:
            st = os.lstat(candidate)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            link = os.readlink(candidate)
            if hops > 16:
                return False
            if link.startswith("/"):
                current = tree
            parts = [p for p in link.split("/") if p] + parts
            continue
        current = candidate
    return True


def image_etc(tree: Path, runtime_dir: Path) -> Path:
    """The ``/etc`` for jobs on the image unpacked at ``tree`` (built once, see above)."""
    target = runtime_dir / f"etc-img-{tree.name}"
    if not tree.is_dir() or tree.is_symlink():
        raise SandboxError(f"the image's tree {tree.name} is gone from the cache",
                           hint="run the job again (the image is pulled again)")
    if target.is_dir():
        os.utime(target)
        return target
    _forget_evicted(runtime_dir, tree.parent)

    def fill(tmp: Path) -> None:
        _copy_etc(tree / "etc", tmp)
        _accounts(tmp)  # (from the copy: the image's tree is read once)
        for name, text in _FILES.items():
            _write(tmp / name, text.encode())

    return build_once(target, fill, "/etc for the image")


def build_once(target: Path, fill: Callable[[Path], None], what: str) -> Path:
    """``target``, a directory (0755) ``fill`` makes in a temporary one renamed into place
    (another runner may build the same at the same moment: the first rename wins);
    SandboxError naming ``what`` if it cannot be made."""
    if target.is_dir():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_native_id()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(mode=0o755)
        tmp.chmod(0o755)  # whatever the umask: jobs run as other uids
        fill(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another runner built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SandboxError(f"cannot make {what}: {e.strerror}") from e
    return target


def _forget_evicted(runtime_dir: Path, trees: Path) -> None:
    """Remove the ``/etc`` copies of images whose trees the cache evicted."""
    for old in runtime_dir.glob("etc-img-*"):
        if not (trees / old.name.removeprefix("etc-img-")).is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _copy_etc(src: Path, dst: Path) -> None:
    """Copy the image's ``/etc`` (a directory of its own, else nothing) into ``dst``: links
    as links (never followed, not even to stat them), files by their own bytes."""
    try:
        if not stat.S_ISDIR(os.lstat(src).st_mode):
            return  # an image whose /etc is a link or a file gets ours only
    except FileNotFoundError:
        return
    total, count, todo = 0, 0, [(src, dst)]
    while todo:
        source_dir, dest_dir = todo.pop()
        with os.scandir(source_dir) as entries:
            for entry in entries:
                count += 1
                if count > MAX_ETC_ENTRIES:
                    raise SandboxError(f"the image's /etc has more than {MAX_ETC_ENTRIES} "
                                       "entries")
                if source_dir == src and entry.name in LEFT_OUT:
                    continue
                st = entry.stat(follow_symlinks=False)
                dest = dest_dir / entry.name
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(entry.path), dest)
                elif stat.S_ISDIR(st.st_mode):
                    dest.mkdir(mode=0o755)
                    todo.append((Path(entry.path), dest))
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    if total > MAX_ETC_BYTES:
                        raise SandboxError(f"the image's /etc is larger than {MAX_ETC_BYTES} "
                                           "bytes")
                    _write(dest, _read(Path(entry.path), st.st_size), st.st_mode & 0o755)


def _accounts(etc: Path) -> None:
    """``passwd`` and ``group`` in our copy ``etc``: the image's entries (from a regular file
    only, never through a link), less any with our name or id, and ours."""
    ours = {"passwd": (f"{JOB_USER}:x:{JOB_UID}:{JOB_GID}:stockade job:{JOB_HOME}:/bin/sh",
                       JOB_UID),
            "group": (f"{JOB_USER}:x:{JOB_GID}:", JOB_GID)}
    for name, (line, number) in ours.items():
        kept = []
        for entry in _regular_text(etc / name).splitlines():
            fields = entry.split(":")
            if len(fields) < 3 or fields[0] == JOB_USER or fields[2] == str(number):
                continue
            kept.append(entry)
        _write(etc / name, ("\n".join([*kept, line]) + "\n").encode())


def _regular_text(path: Path) -> str:
    """The text of the regular file ``path`` in our copy (a link there: empty)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, MAX_ACCOUNTS_BYTES).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _read(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        chunks, left = [], size
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` anew (an entry there is removed first, never written through)."""
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
