"""The synthetic ``/etc`` of ``image: host`` sandboxes, built once per change of its host inputs.

Never the host's ``/etc``: only the job user, name-service switches to files, an empty
``resolv.conf`` (no DNS inside), ``hosts`` for localhost, the dynamic linker cache, the
Debian ``alternatives`` symlinks (``/usr/bin/awk`` and friends point through them) and the
host's public CA store (``ssl/certs``: the bundle, plus the operator's ``tls_extra_ca_file``,
and the hashed links, which point into ``/usr``), so that curl, pip, git and Python's ``ssl``
verify TLS at their default paths. Only PEM certificate blocks are ever copied from a file:
no private key (``/etc/ssl/private`` or a combined PEM) reaches a job.

A copy is named by a digest of the identity (inode, size, times) of its host inputs, so a
host update (``update-ca-certificates`` and ``ldconfig`` rename new files into place) gets a
new copy at the next job, and checking for one costs a few ``stat`` calls, not a read.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
import time
from pathlib import Path

from stockade.errors import SandboxError
from stockade.hashing import sha256

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
TOUCH_EVERY_S = 3600.0  # how often a resident runner marks its copy as in use
_HOST_LINKS = ("os-release", "localtime")
_LAYOUT = 2  # bump when what a copy holds changes
CERTS = Path("ssl/certs")
BUNDLE = "ca-certificates.crt"
MAX_PEM_BYTES = 16 * 1024 * 1024
_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?"
                   rb"-----END CERTIFICATE-----")
_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_EXTRA_HINT = "set tls_extra_ca_file to a PEM file of CA certificates only"

Stamp = tuple[tuple[int, int, int, int] | None, ...]
# per process: the copy last chosen for each (runtime_dir, host_etc, extra CA file), the
# stamp it was chosen for and when
_known: dict[tuple[Path, Path, str], tuple[Stamp, Path, float]] = {}


def synthetic_etc(runtime_dir: Path, host_etc: Path = Path("/etc"),
                  tls_extra_ca_file: str = "") -> Path:
    """The path of a read-only-to-others synthetic ``/etc``, created if missing or outdated.

    ``tls_extra_ca_file`` (an operator setting) is appended to the CA bundle; SandboxError
    if it cannot be read or holds anything but certificates."""
    key = (runtime_dir, host_etc, tls_extra_ca_file)
    stamp = _stamp(host_etc, tls_extra_ca_file)
    known = _known.get(key)
    if known is not None and known[0] == stamp and os.path.isdir(known[1]) \
            and time.monotonic() - known[2] < TOUCH_EVERY_S:
        return known[1]
    digest = sha256(repr((_LAYOUT, sorted(_FILES.items()), str(host_etc),
                                  tls_extra_ca_file, stamp)).encode()).hexdigest()[:16]
    target = runtime_dir / f"etc-{digest}"
    if target.is_dir():
        os.utime(target)  # in use: not stale for other runners
    else:
        _build(target, runtime_dir, host_etc, extra_certificates(tls_extra_ca_file))
    _remove_stale(runtime_dir, target)
    _known[key] = (stamp, target, time.monotonic())
    return target


def _remove_stale(runtime_dir: Path, current: Path) -> None:
    """Remove outdated copies no runner can still be using."""
    for old in runtime_dir.glob("etc-*"):
        try:
            stale = old != current and time.time() - old.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:  # another runner removed it
            continue
        if stale:
            shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _inputs(host_etc: Path, extra: str) -> tuple[str, ...]:
    paths = [host_etc / name for name in _HOST_FILES]
    paths += [host_etc / "alternatives", host_etc / CERTS, host_etc / CERTS / BUNDLE]
    return tuple(str(p) for p in paths) + ((extra,) if extra else ())


def _stamp(host_etc: Path, extra: str) -> Stamp:
    found: list[tuple[int, int, int, int] | None] = []
    for path in _inputs(host_etc, extra):
        try:
            st = os.stat(path)
            found.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            found.append(None)
    return tuple(found)


def certificates(data: bytes) -> bytes:
    """The PEM certificate blocks of ``data``, each ending in a newline; nothing else of it."""
    return b"".join(block.replace(b"\r", b"") + b"\n" for block in _CERT.findall(data))


def extra_certificates(path: str) -> bytes:
    """The certificates of the operator's ``tls_extra_ca_file`` (empty if unset)."""
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise SandboxError(f"cannot read tls_extra_ca_file {path}: {e.strerror}",
                           hint=_EXTRA_HINT) from e
    others = sorted({kind.decode() for kind in _BLOCK.findall(data)} - {"CERTIFICATE"})
    if others or len(data) > MAX_PEM_BYTES:
        what = ", ".join(others) or f"more than {MAX_PEM_BYTES} bytes"
        raise SandboxError(f"tls_extra_ca_file {path} holds more than certificates ({what}); "
                           "nothing of it is given to jobs", hint=_EXTRA_HINT)
    certs = certificates(data)
    if not certs:
        raise SandboxError(f"tls_extra_ca_file {path} holds no PEM certificate "
                           "(-----BEGIN CERTIFICATE-----)", hint=_EXTRA_HINT)
    return certs


def _build(target: Path, runtime_dir: Path, host_etc: Path, extra_ca: bytes) -> None:
    # per thread: a resident runner's jobs may find a host update at the same moment
    tmp = runtime_dir / f".etc-{os.getpid()}-{threading.get_native_id()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    tmp.chmod(0o755)  # whatever the umask: jobs run as other uids
    for name, text in _FILES.items():
        (tmp / name).write_text(text)
    for name in _HOST_FILES:
        if (host_etc / name).exists():
            shutil.copyfile(host_etc / name, tmp / name)
    for name in _HOST_LINKS:
        if (host_etc / name).is_symlink():
            os.symlink(os.readlink(host_etc / name), tmp / name)
    _copy_alternatives(host_etc / "alternatives", tmp / "alternatives")
    _copy_ca_store(host_etc / CERTS, tmp / CERTS, extra_ca)
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


def _copy_ca_store(src: Path, dst: Path, extra_ca: bytes) -> None:
    """The host's CA directory: links into ``/usr`` or within the directory as they are,
    the certificates of its files (the bundle plus ``extra_ca``); no subdirectory."""
    dst.mkdir(mode=0o755, parents=True)
    entries = list(os.scandir(src)) if src.is_dir() else []
    for entry in entries:
        if entry.name == BUNDLE:  # built below, never written through a host link
            continue
        if entry.is_symlink():
            link = os.readlink(entry.path)
            within = "/" not in link and link not in (".", "..")
            if within or (link.startswith("/usr/") and ".." not in link.split("/")):
                os.symlink(link, dst / entry.name)
        elif entry.is_file(follow_symlinks=False):
            certs = _host_certificates(Path(entry.path))
            if certs:
                (dst / entry.name).write_bytes(certs)
    bundle = _host_certificates(src / BUNDLE) + extra_ca
    if bundle:
        (dst / BUNDLE).write_bytes(bundle)


def _host_certificates(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return certificates(f.read(MAX_PEM_BYTES))
    except OSError:
        return b""
