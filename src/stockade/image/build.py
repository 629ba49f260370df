"""``stockade image build``: a minimal Debian image made with mmdebstrap, reproducibly.

mmdebstrap installs the suite's Essential packages (``--variant essential``, the smallest a
Debian system can be) plus ``--include`` from the mirror into a tarball, with
``SOURCE_DATE_EPOCH`` set: the same inputs (suite, packages, mirror state, epoch) give the
same bytes, and so the same digests (mmdebstrap's own guarantee, tested here). A hook
resets the two files a build would take from the host (``/etc/resolv.conf`` empty,
``/etc/hostname`` ``localhost``); ``/dev`` is left out (a job gets its own). Documentation,
manual pages and translations are not installed (copyright files are).

The tarball becomes one gzip layer (no timestamp or name in its header), then an OCI image
config and manifest, serialised one way only (``layout.canonical``), and the image is
written to the local OCI layout under its name. The manifest's digest is the image's.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple

from stockade.errors import InfrastructureError, UsageError
from stockade.image.layout import OCI_MANIFEST, Layout, canonical

MMDEBSTRAP = "/usr/bin/mmdebstrap"
BUILD_S = 3600.0
CHUNK = 1 << 20
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
# essential: Debian's smallest system; extract: the --include packages unpacked, nothing run
VARIANTS = ("essential", "minbase", "apt", "required", "important", "standard", "extract",
            "custom")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_SUITE = re.compile(r"[a-z][a-z0-9-]{0,39}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}")
_HOOK = (': > "$1/etc/resolv.conf.new" && mv -f "$1/etc/resolv.conf.new" "$1/etc/resolv.conf"'
         ' && printf "localhost\\n" > "$1/etc/hostname.new"'
         ' && mv -f "$1/etc/hostname.new" "$1/etc/hostname"')
_SLIM = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
         "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/locale/*",
         "path-exclude=/usr/share/info/*")


class BuildRequest(NamedTuple):
    """What to build (every field is part of what makes the digest)."""

    name: str
    suite: str
    include: tuple[str, ...] = ()
    mirror: str = ""  # a URL or a sources.list line; empty: mmdebstrap's default
    variant: str = "essential"
    epoch: int = 0  # SOURCE_DATE_EPOCH: every timestamp of the image


def check(request: BuildRequest) -> None:
    """UsageError naming the first field that cannot be built from."""
    if not _NAME.fullmatch(request.name) or len(request.name) > 200:
        raise UsageError(f"image name {request.name[:100]!r} is not a repository path",
                         hint="lowercase letters, digits, '.', '_', '-' and '/', e.g. team/base")
    if not _SUITE.fullmatch(request.suite):
        raise UsageError(f"suite {request.suite[:60]!r} is not a Debian suite name",
                         hint="e.g. --suite bookworm")
    bad = [p for p in request.include if not _PACKAGE.fullmatch(p)]
    if bad or len(request.include) > 500:
        raise UsageError(f"--include {bad[0][:60] if bad else '...'!r}: not a package name "
                         "(or more than 500)", hint="e.g. --include python3,ca-certificates")
    if request.variant not in VARIANTS:
        raise UsageError(f"--variant {request.variant[:40]!r} is not one of "
                         f"{', '.join(VARIANTS)}", hint="the default, essential, is smallest")
    if any(c in request.mirror for c in "\n\r\0") or len(request.mirror) > 1000:
        raise UsageError("--mirror must be one URL or one sources.list line",
                         hint="e.g. --mirror http://deb.debian.org/debian")
    if not 0 <= request.epoch < 2**33:
        raise UsageError(f"--source-date-epoch {request.epoch} is out of range",
                         hint="seconds since 1970, e.g. $(date +%s)")


def build(request: BuildRequest, layout: Layout, work: Path) -> str:
    """Build the image into ``layout`` (using ``work``, a root-only scratch directory, which
    is emptied); the manifest's digest."""
    check(request)
    if not os.access(MMDEBSTRAP, os.X_OK):
        raise InfrastructureError("mmdebstrap is not installed",
                                  hint="apt-get install mmdebstrap (make demo does)")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)
    try:
        tarball = work / "rootfs.tar"
        _mmdebstrap(request, tarball, work)
        layer, diff_id = _compress(tarball, work / "layer.tar.gz")
        tarball.unlink()
        layer_digest = "sha256:" + layer[1]
        layer_blob = layout.add_file(layer[0], layer_digest)
        config = layout.add_bytes(canonical(_config(request, diff_id)))
        manifest = layout.add_bytes(canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": LAYER, "digest": layer_blob.digest,
                        "size": layer_blob.size}]}))
        layout.tag(request.name, manifest)
        return manifest.digest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mmdebstrap(request: BuildRequest, tarball: Path, work: Path) -> None:
    argv = [MMDEBSTRAP, "--quiet", "--mode=root", f"--variant={request.variant}",
            "--format=tar", "--skip=output/dev", f"--customize-hook={_HOOK}",
            "--aptopt=Acquire::Languages \"none\"",
            *[f"--dpkgopt={option}" for option in _SLIM]]
    if request.include:
        argv.append("--include=" + ",".join(request.include))
    argv += [request.suite, str(tarball)]
    if request.mirror:
        argv.append(request.mirror)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TMPDIR": str(work),
           "SOURCE_DATE_EPOCH": str(request.epoch), "HOME": str(work)}
    log = work / "mmdebstrap.log"
    with log.open("wb") as out:
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=BUILD_S, check=False)
        except subprocess.TimeoutExpired:
            raise InfrastructureError(f"mmdebstrap took longer than {BUILD_S:.0f} s",
                                      hint="check the mirror") from None
    if proc.returncode != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()[-15:]
        raise InfrastructureError(
            f"mmdebstrap failed (exit {proc.returncode}):\n  " + "\n  ".join(tail),
            hint="check --suite, --include and --mirror (is every package in the mirror?)")


class _Hashing:
    """A file that hashes what is written to it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _compress(tarball: Path, target: Path) -> tuple[tuple[Path, str], str]:
    """gzip ``tarball`` into ``target`` with no name or time in the header: ``((target,
    sha256 of it), DiffID)``."""
    diff = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with tarball.open("rb") as src, os.fdopen(fd, "wb") as raw:
        out = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=out,
                           compresslevel=6, mtime=0) as gz:
            while chunk := src.read(CHUNK):
                diff.update(chunk)
                gz.write(chunk)
    return (target, out.hash.hexdigest()), "sha256:" + diff.hexdigest()


def _config(request: BuildRequest, diff_id: str) -> dict[str, object]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(request.epoch))
    how = (f"stockade image build {request.name} --suite {request.suite} "
           f"--variant {request.variant}"
           + (f" --include {','.join(request.include)}" if request.include else ""))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {"architecture": arch, "os": "linux", "created": created,
            "config": {"Env": [f"PATH={PATH}"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created, "created_by": how}]}
