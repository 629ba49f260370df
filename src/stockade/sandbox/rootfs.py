"""The synthetic ``/etc`` of ``image: host`` sandboxes, built once per runtime directory.

Never the host's ``/etc``: only the job user, name-service switches to files, an empty
``resolv.conf`` (no DNS inside), ``hosts`` for localhost, the dynamic linker cache and the
Debian ``alternatives`` symlinks (``/usr/bin/awk`` and friends point through them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

JOB_UID = 1000
JOB_GID = 1000
JOB_USER = "ci"
JOB_HOME = "/tmp"

_FILES = {
    "passwd": f"{JOB_USER}:x:{JOB_UID}:{JOB_GID}:stockade job:{JOB_HOME}:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": f"{JOB_USER}:x:{JOB_GID}:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "resolv.conf": "",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
}
_HOST_FILES = ("ld.so.cache",)
STALE_AFTER_S = 7 * 24 * 3600  # longer than any job may run
_HOST_LINKS = ("os-release", "localtime")


def _digest(host_etc: Path) -> str:
    h = hashlib.sha256(repr(sorted(_FILES.items())).encode())
    for name in _HOST_FILES:
        p = host_etc / name
        if p.exists():
            h.update(p.read_bytes())
    alternatives = host_etc / "alternatives"
    if alternatives.is_dir():
        for entry in sorted(os.scandir(alternatives), key=lambda e: e.name):
            if entry.is_symlink():
                h.update(f"{entry.name}={os.readlink(entry.path)}".encode())
    return h.hexdigest()[:16]


def synthetic_etc(runtime_dir: Path, host_etc: Path = Path("/etc")) -> Path:
    """The path of a read-only-to-others synthetic ``/etc``, created if missing."""
    target = runtime_dir / f"etc-{_digest(host_etc)}"
    if not target.is_dir():
        _build(target, runtime_dir, host_etc)
    for old in runtime_dir.glob("etc-*"):  # outdated copies no runner can still be using
        if old != target and time.time() - old.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _build(target: Path, runtime_dir: Path, host_etc: Path) -> None:
    tmp = runtime_dir / f".etc-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    for name, text in _FILES.items():
        (tmp / name).write_text(text)
    for name in _HOST_FILES:
        if (host_etc / name).exists():
            shutil.copyfile(host_etc / name, tmp / name)
    for name in _HOST_LINKS:
        if (host_etc / name).is_symlink():
            os.symlink(os.readlink(host_etc / name), tmp / name)
    _copy_alternatives(host_etc / "alternatives", tmp / "alternatives")
    for p in tmp.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    try:
        tmp.rename(target)
    except OSError:  # another runner built it first
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_alternatives(src: Path, dst: Path) -> None:
    dst.mkdir(mode=0o755)
    if not src.is_dir():
        return
    for entry in os.scandir(src):
        if entry.is_symlink():
            link = os.readlink(entry.path)
            if link.startswith("/usr/") or link.startswith("/bin/"):
                os.symlink(link, dst / entry.name)
