"""What an unpacked image says it holds: its dpkg database and its ``os-release``.

The tree is the image author's: every file is opened from the tree's directory descriptor a
component at a time with ``O_NOFOLLOW`` (a link anywhere on the way is refused, never
followed), must be a regular file, and is read within a bound. The dpkg database is
``var/lib/dpkg/status`` and, as distroless images have it, one paragraph file per package in
``var/lib/dpkg/status.d/``. A package counts when its files are in the image (its state is
neither ``not-installed`` nor ``config-files``; ``status.d`` entries have no state). Names,
versions and architectures must have Debian's syntax; anything else is refused with a
clear error that quotes none of the image's text.

``os-release`` is read from ``etc/os-release`` and else ``usr/lib/os-release`` (on Debian the
first is a link to the second), both without following links. An image without either has
an unknown distribution: its packages are listed, but no distribution's advisories apply.

The scan reads what the image says about itself: it finds stale images, not a hostile image
author (who can write any database).
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from stockade.errors import StockadeError
from stockade.image.versions import valid_version

STATUS = "var/lib/dpkg/status"
STATUS_D = "var/lib/dpkg/status.d"
OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
MAX_DATABASE_BYTES = 64 * 1024 * 1024  # status and status.d together
MAX_PACKAGES = 100_000
MAX_STATUS_D_FILES = 100_000
MAX_OS_RELEASE_BYTES = 64 * 1024
MAX_FIELD = 256
_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")
_ARCH = re.compile(r"[a-z0-9][a-z0-9-]*")
_SOURCE = re.compile(r"(?P<name>[a-z0-9][a-z0-9+.-]*)(?:\s+\((?P<version>[^()\s]+)\))?")
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_ABSENT = ("not-installed", "config-files")
_WANTED = ("Package", "Status", "Version", "Architecture", "Source")


class UnreadablePackages(StockadeError):
    """The image's package database is there but cannot be read (a link, not a regular file,
    over a bound, malformed): what the image holds cannot be told."""

    exit_code = 1


class Package(NamedTuple):
    """One installed binary package."""

    name: str
    version: str
    architecture: str
    source: str  # the source package's name (OSV's Debian advisories name these)
    source_version: str  # differs from version for binNMUs (1.2-3+b1 of source 1.2-3)


class Distribution(NamedTuple):
    """The image's ``os-release``: ``id`` (``debian``), ``version_id`` (``12``), and how it
    names itself; empty strings when unknown."""

    id: str = ""
    version_id: str = ""
    codename: str = ""
    pretty_name: str = ""

    @property
    def osv_ecosystems(self) -> tuple[str, ...]:
        """The OSV ecosystems whose advisories apply (``Debian:12`` and ``Debian``)."""
        if self.id != "debian":
            return ()
        major = self.version_id.split(".", 1)[0]
        return (f"Debian:{major}", "Debian") if major.isdigit() else ("Debian",)


class ImageContents(NamedTuple):
    """The packages (sorted by name and architecture) and the distribution of an image."""

    packages: tuple[Package, ...]
    distribution: Distribution


def read_contents(tree: Path) -> ImageContents:
    """The packages and distribution of the image unpacked at ``tree`` (see the module
    docstring); UnreadablePackages if its database cannot be read."""
    return ImageContents(installed_packages(tree), distribution(tree))


def installed_packages(tree: Path) -> tuple[Package, ...]:
    """The packages dpkg lists as present in ``tree`` (none without a dpkg database)."""
    found: dict[tuple[str, str], Package] = {}
    budget = [MAX_DATABASE_BYTES]
    status = _read_file(tree, STATUS, budget)
    if status is not None:
        _add(found, parse_status(status, STATUS, with_state=True))
    for number, raw in _read_directory(tree, STATUS_D, budget):
        _add(found, parse_status(raw, f"{STATUS_D} file {number}", with_state=False))
    return tuple(sorted(found.values(), key=lambda p: (p.name, p.architecture)))


def _add(found: dict[tuple[str, str], Package], packages: list[Package]) -> None:
    for package in packages:
        found.setdefault((package.name, package.architecture), package)
        if len(found) > MAX_PACKAGES:
            raise UnreadablePackages(f"the image lists more than {MAX_PACKAGES} packages")


def parse_status(raw: bytes, where: str, with_state: bool = True) -> list[Package]:
    """The present packages of a dpkg status text (``with_state``: a ``Status`` field decides;
    without it, as in ``status.d``, every paragraph is a package)."""
    packages = []
    for number, fields in enumerate(_paragraphs(raw, where), 1):
        if "Package" not in fields:
            continue
        if with_state and not _present(fields.get("Status", "")):
            continue
        packages.append(_package(fields, f"{where}: package {number}"))
        if len(packages) > MAX_PACKAGES:
            raise UnreadablePackages(f"{where} lists more than {MAX_PACKAGES} packages")
    return packages


def _paragraphs(raw: bytes, where: str) -> Iterator[dict[str, str]]:
    """The fields stockade reads of each paragraph (continuation lines are skipped)."""
    fields: dict[str, str] = {}
    lines = io.TextIOWrapper(io.BytesIO(raw), "utf-8", "replace", newline="\n")  # (lazily)
    for number, text in enumerate(lines, 1):
        line = text.rstrip("\n")
        if not line.strip():
            if fields:
                yield fields
            fields = {}
        elif line[0] in " \t" or line.startswith("#"):
            continue
        else:
            key, sep, value = line.partition(":")
            if not sep or not key or len(key) > 64 or key != key.strip():
                raise UnreadablePackages(f"{where}: line {number} is not a field")
            if key in _WANTED:
                fields[key] = value.strip()
    if fields:
        yield fields


def _present(status: str) -> bool:
    """Whether a ``Status`` (want, error flag, state) says the package's files are there."""
    words = status.split()
    return len(words) == 3 and words[2] not in _ABSENT


def _package(fields: dict[str, str], where: str) -> Package:
    name, version = fields["Package"], fields.get("Version", "")
    architecture = fields.get("Architecture", "")
    if len(name) > MAX_FIELD or not _NAME.fullmatch(name):
        raise UnreadablePackages(f"{where}: its name is not a Debian package name")
    if not valid_version(version):
        raise UnreadablePackages(f"{where} ({name}): its Version is not a Debian version")
    if len(architecture) > MAX_FIELD or not _ARCH.fullmatch(architecture):
        raise UnreadablePackages(f"{where} ({name}): its Architecture is malformed")
    source, source_version = name, version
    if "Source" in fields:
        match = _SOURCE.fullmatch(fields["Source"][:MAX_FIELD * 2])
        if match is None or len(match["name"]) > MAX_FIELD:
            raise UnreadablePackages(f"{where} ({name}): its Source is malformed")
        source = match["name"]
        if match["version"] is not None:
            if not valid_version(match["version"]):
                raise UnreadablePackages(f"{where} ({name}): its Source version is not a "
                                         "Debian version")
            source_version = match["version"]
    return Package(name, version, architecture, source, source_version)


def distribution(tree: Path) -> Distribution:
    """The image's ``os-release`` (see the module docstring); unknown fields empty."""
    for path in OS_RELEASE:
        try:
            raw = _read_file(tree, path, [MAX_OS_RELEASE_BYTES])
        except UnreadablePackages:
            continue  # a link (Debian's etc/os-release), a directory, too large: the next
        if raw is not None:
            return parse_os_release(raw)
    return Distribution()


def parse_os_release(raw: bytes) -> Distribution:
    """``ID``, ``VERSION_ID``, ``VERSION_CODENAME`` and ``PRETTY_NAME`` of an os-release
    text; a value that is not a plain token is left out (the pretty name is cut and cleaned)."""
    values: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key in ("ID", "VERSION_ID", "VERSION_CODENAME", "PRETTY_NAME"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    token = {k: v for k, v in values.items() if _TOKEN.fullmatch(v)}
    pretty = "".join(c for c in values.get("PRETTY_NAME", "")[:80] if c.isprintable())
    return Distribution(token.get("ID", ""), token.get("VERSION_ID", ""),
                        token.get("VERSION_CODENAME", ""), pretty)


# -- reading the tree without following links -----------------------------------------------

def _open_dir(tree: Path, parts: list[str], where: str) -> int | None:
    """A descriptor of directory ``parts`` in ``tree`` (None if it is not there)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tree, flags)
    try:
        for part in parts:
            try:
                child = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise _refused(e, where) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refused(e: OSError, where: str) -> UnreadablePackages:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnreadablePackages(f"{where} in the image is, or is under, a link or a file: "
                                  "not followed")
    return UnreadablePackages(f"{where} in the image cannot be read: {e.strerror}")


def _read_at(dir_fd: int, name: str, budget: list[int], where: str) -> bytes | None:
    """The bytes of regular file ``name`` in ``dir_fd`` (None if absent), taken from
    ``budget[0]``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _refused(e, where) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadablePackages(f"{where} in the image is not a regular file")
        if st.st_size > budget[0]:
            raise UnreadablePackages(f"{where} in the image is larger than the "
                                     f"{MAX_DATABASE_BYTES} bytes read")
        chunks, left = [], budget[0] + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > budget[0]:
            raise UnreadablePackages(f"{where} in the image grew past the bytes read")
        budget[0] -= len(data)
        return data
    finally:
        os.close(fd)


def _read_file(tree: Path, path: str, budget: list[int]) -> bytes | None:
    """Regular file ``path`` (relative) in ``tree``, links refused; None if absent."""
    *parents, name = path.split("/")
    dir_fd = _open_dir(tree, parents, path)
    if dir_fd is None:
        return None
    try:
        return _read_at(dir_fd, name, budget, path)
    finally:
        os.close(dir_fd)


def _read_directory(tree: Path, path: str, budget: list[int]) -> Iterator[tuple[int, bytes]]:
    """The regular files of directory ``path`` in ``tree`` (none if absent), numbered in the
    order of their names; other entries are skipped, links never followed."""
    dir_fd = _open_dir(tree, path.split("/"), path)
    if dir_fd is None:
        return
    try:
        names = []
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                names.append(entry.name)
                if len(names) > MAX_STATUS_D_FILES:
                    raise UnreadablePackages(f"{path} in the image has more than "
                                             f"{MAX_STATUS_D_FILES} entries")
        for number, name in enumerate(sorted(names), 1):
            if name.startswith(".") or name.endswith(".md5sums"):
                continue  # (distroless keeps each package's md5sums there too)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                raw = _read_at(dir_fd, name, budget, f"{path} file {number}")
                if raw is not None:
                    yield number, raw
    finally:
        os.close(dir_fd)
