"""Leak scanning: look for issued values (and their encodings) in files before they leave.

A file is scanned as it is, and, when its first bytes say it is one, as the archive or
compressed stream it holds: gzip, bzip2, xz, tar (plain or compressed by any of these) and zip
(stored, deflated, bzip2 or LZMA entries), recursively. Every layer's bytes are scanned raw as
well (names in a tar or zip, a gzip header's file name, data after an archive's end).

Scanning is bounded: at most :attr:`ScanLimits.max_depth` nested layers, a total of
decompressed bytes proportional to the file's size (a bomb stops there), a number of entries,
and a time. A file that cannot be scanned completely (too deep, too large once decompressed,
corrupt or truncated, an encrypted zip entry, a compression we do not read, such as zstd or
7z) is reported as :attr:`ScanResult.unscannable`, with a reason that never quotes the file:
the caller must not publish it. The file is opened without following links, read through its
descriptor, and only up to the size it had when opened.
"""

from __future__ import annotations

import bz2
import copy
import lzma
import os
import stat
import struct
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from stockade.secrets.redact import Masker

CHUNK = 1024 * 1024
_HEAD = 512  # enough to recognise every format below (tar's magic is at 257)
_SPOOL_IN_MEMORY = 16 * 1024 * 1024  # a nested zip larger than this is spooled to a temp file
_MAX_TAR_HEADER = 1024 * 1024  # long names and pax headers are read into memory by tarfile


class ScanLimits(NamedTuple):
    """How far :func:`scan_file` goes before it calls a file unscannable."""

    max_depth: int = 4  # nested layers: a .tar.gz is two, a .tar.gz inside a zip three
    ratio: int = 32  # decompressed bytes allowed per byte of the file ...
    floor: int = 64 * 1024 * 1024  # ... but at least this many ...
    cap: int = 1024 * 1024 * 1024  # ... and never more than this
    max_entries: int = 100_000  # tar and zip entries, all layers together
    max_seconds: float = 120.0

    def budget(self, size: int) -> int:
        """The decompressed bytes allowed for a file of ``size`` bytes."""
        return min(self.cap, max(self.floor, self.ratio * size))


DEFAULT_LIMITS = ScanLimits()


class ScanResult(NamedTuple):
    """What :func:`scan_file` found: the names of the secrets it saw (never their values), and
    why the file could not be scanned completely (None if it was)."""

    found: frozenset[str] = frozenset()
    unscannable: str | None = None

    @property
    def clean(self) -> bool:
        """Nothing found, and everything scanned: the file may be published."""
        return not self.found and self.unscannable is None


class Unscannable(Exception):
    """A layer could not be scanned completely (the message says why, without its content)."""


def scan_file(path: Path, masker: Masker, limits: ScanLimits = DEFAULT_LIMITS) -> ScanResult:
    """Scan the regular file at ``path`` (opened without following links) for ``masker``'s
    values, inside archives and compressed streams too."""
    if not masker:
        return ScanResult()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:  # a symbolic link (ELOOP), gone, ...: nothing to publish either
        return ScanResult(unscannable=f"it cannot be opened ({os.strerror(e.errno or 0)})")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ScanResult(unscannable="not a regular file")
        scan = _Scan(masker, limits, limits.budget(info.st_size))
        try:
            _top(fd, info.st_size, scan)
        except Unscannable as e:
            return ScanResult(frozenset(scan.found), str(e))
        except (OSError, ValueError, EOFError, struct.error) as e:  # a reader gave up on it
            return ScanResult(frozenset(scan.found), f"it could not be read ({type(e).__name__})")
        return ScanResult(frozenset(scan.found))
    finally:
        os.close(fd)


@dataclass
class _Scan:
    """The state of one file's scan: what was found and what is left of each bound."""

    masker: Masker
    limits: ScanLimits
    budget: int  # decompressed bytes allowed
    found: set[str] = field(default_factory=set)
    decompressed: int = 0
    entries: int = 0
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.limits.max_seconds

    def charge(self, n: int) -> None:
        """Count ``n`` decompressed bytes (and the time)."""
        self.decompressed += n
        if self.decompressed > self.budget:
            raise Unscannable(f"it decompresses to more than {self.budget} bytes "
                              "(a compression bomb?)")
        self.tick()

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise Unscannable(f"scanning it took longer than {self.limits.max_seconds:.0f} s")

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise Unscannable(f"it holds more than {self.limits.max_entries} archive entries")


class _Source:
    """The bytes of one layer, pulled on demand; scanned for secrets as they pass (unless the
    layer above already saw them raw) and charged to the budget (if decompressed)."""

    def __init__(self, chunks: Iterator[bytes], scan: _Scan, *, scanned: bool,
                 charged: bool) -> None:
        self._chunks = chunks
        self._scan = scan
        self._scanned = scanned
        self._charged = charged
        self._buf = b""
        self._at = 0  # _buf[_at:] is still to be read
        self._tail = b""  # the end of the last chunk: a value may straddle two chunks
        self.pulled = 0  # bytes taken from the chunks so far
        self.limit: int | None = None  # refuse to pull beyond this (a tar header's bound)

    def _pull(self) -> bool:
        chunk = next(self._chunks, b"")
        if not chunk:
            return False
        self.pulled += len(chunk)
        if self.limit is not None and self.pulled > self.limit:
            raise Unscannable(f"a tar header is larger than {_MAX_TAR_HEADER} bytes")
        if self._charged:
            self._scan.charge(len(chunk))
        else:
            self._scan.tick()
        if self._scanned:
            data = self._tail + chunk
            self._scan.found |= self._scan.masker.names_in(data)
            keep = self._scan.masker.longest - 1
            self._tail = data[-keep:] if keep > 0 else b""
        self._buf = self._buf[self._at:] + chunk if self._at < len(self._buf) else chunk
        self._at = 0
        return True

    def _buffered(self) -> int:
        return len(self._buf) - self._at

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end), left unread."""
        while self._buffered() < n and self._pull():
            pass
        return self._buf[self._at:self._at + n]

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left if ``n`` < 0: avoid it)."""
        while (n < 0 or self._buffered() < n) and self._pull():
            pass
        if n < 0:
            n = self._buffered()
        out = self._buf[self._at:self._at + n]
        self._at += len(out)
        return out

    def chunks(self) -> Iterator[bytes]:
        """What is left, chunk by chunk."""
        while self._buffered() or self._pull():
            out, self._buf, self._at = self._buf[self._at:], b"", 0
            yield out

    def drain(self) -> None:
        """Read (and so scan) what is left."""
        for _ in self.chunks():
            pass


def _fd_chunks(fd: int, size: int, start: int = 0) -> Iterator[bytes]:
    """The file's bytes from ``start`` up to ``size`` (its size when opened)."""
    pos = start
    while pos < size:
        chunk = os.pread(fd, min(CHUNK, size - pos), pos)
        if not chunk:
            return
        pos += len(chunk)
        yield chunk


def _top(fd: int, size: int, scan: _Scan) -> None:
    src = _Source(_fd_chunks(fd, size), scan, scanned=True, charged=False)
    kind = _kind(src.peek(_HEAD))
    if kind == "zip" or (kind is None and _zip_end(_FdFile(fd, size)) is not None):
        src.drain()  # raw first: names, stored entries, anything around the archive
        _zip(_FdFile(fd, size), scan, 1)
    else:
        _layer(src, scan, 0, kind)


# --- formats --------------------------------------------------------------------------------

_COMPRESSED = ("gzip", "bzip2", "xz")
_UNREADABLE = {b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4",
               b"7z\xbc\xaf\x27\x1c": "7z", b"Rar!\x1a\x07": "rar", b"LZIP": "lzip",
               b"\x1f\x9d": "compress (.Z)"}


def _kind(head: bytes) -> str | None:
    """What the first bytes of a layer say it is (None: data to scan as it is)."""
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in (b"1AY&SY",
                                                                   b"\x17rE8P\x90"):
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return next((name for magic, name in _UNREADABLE.items() if head.startswith(magic)), None)


def _layer(src: _Source, scan: _Scan, depth: int, kind: str | None = None) -> None:
    """Scan one layer (``src``, ``depth`` layers deep), and what it holds."""
    kind = kind or _kind(src.peek(_HEAD))
    if kind is not None:
        if depth >= scan.limits.max_depth:
            raise Unscannable(f"archives are nested more than {scan.limits.max_depth} deep")
        if kind in _COMPRESSED:
            inner = _Source(_decompressed(src, kind), scan, scanned=True, charged=True)
            _layer(inner, scan, depth + 1)
        elif kind == "tar":
            _tar(src, scan, depth + 1)
        elif kind == "zip":
            with tempfile.SpooledTemporaryFile(_SPOOL_IN_MEMORY) as spool:
                for chunk in src.chunks():
                    spool.write(chunk)
                _zip(spool, scan, depth + 1)
        else:
            raise Unscannable(f"{kind} data cannot be scanned")
    src.drain()


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Zlib:
    """zlib's decompressor with the interface of bz2's and lzma's."""

    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._d.decompress(self._d.unconsumed_tail + data, max(max_length, 0))


_STREAMS: dict[str, Callable[[], _Decompressor]] = {
    "gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "bzip2": bz2.BZ2Decompressor,
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
}
_MAGIC = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00"}


def _decompressed(src: _Source, kind: str) -> Iterator[bytes]:
    """The decompressed bytes of ``src`` (every member of a multi-member stream), never more
    than a chunk at a time."""
    d = _STREAMS[kind]()
    data = b""  # input not given to the decompressor yet
    try:
        while True:
            if d.eof:  # another member, or trailing bytes (scanned raw in ``src``)
                data = d.unused_data + data or src.read(CHUNK)
                if not data.startswith(_MAGIC[kind]):
                    return
                d = _STREAMS[kind]()
            if not data and d.needs_input:
                data = src.read(CHUNK)
            out = d.decompress(data, CHUNK)
            if out:
                yield out
            elif not data:  # no input left, nothing more comes out, no end of stream
                raise Unscannable(f"truncated {kind} data")
            data = b""
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise Unscannable(f"corrupt {kind} data") from e


def _tar(src: _Source, scan: _Scan, depth: int) -> None:
    """Every member of the tar stream in ``src`` (its headers were scanned raw in ``src``)."""
    try:
        src.limit = src.pulled + _MAX_TAR_HEADER  # tarfile reads a header whole into memory
        with tarfile.open(fileobj=src, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                src.limit = None
                scan.entry()
                if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                    f = archive.extractfile(member)
                    if f is not None:
                        # a sparse member's holes are made up: they count like decompression
                        body = _Source(_file_chunks(f), scan, scanned=False,
                                       charged=member.issparse())
                        _layer(body, scan, depth)
                src.limit = src.pulled + _MAX_TAR_HEADER
    except tarfile.TarError as e:
        raise Unscannable("corrupt tar data") from e
    finally:
        src.limit = None


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


# --- zip ------------------------------------------------------------------------------------

class _FdFile:
    """A read-only, seekable file object over a descriptor, limited to ``size`` bytes."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size, self._pos = fd, size, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n < 0 else min(n, self._size - self._pos)
        data = os.pread(self._fd, max(n, 0), self._pos)
        self._pos += len(data)
        return data

    def seekable(self) -> bool:
        return True


_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CD_ENTRY = struct.Struct("<4s6H3L5H2L")
_MAX_CENTRAL_DIRECTORY = 64 * 1024 * 1024
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


class _Seekable(Protocol):
    def seek(self, offset: int, whence: int = ..., /) -> int: ...
    def read(self, n: int = ..., /) -> bytes: ...


def _zip_end(f: _Seekable) -> tuple[int, int] | None:
    """Where the central directory of the zip archive ``f`` starts, and its size (None if
    ``f`` has no end of central directory pointing at one)."""
    size = f.seek(0, 2)
    tail_start = max(0, size - (_EOCD.size + 65535))
    f.seek(tail_start)
    tail = f.read(size - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    entries, cd_size = _EOCD.unpack_from(tail, at)[4:6]
    cd_end = tail_start + at
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        cd_end = tail_start + locator - _ZIP64_EOCD.size  # the zip64 record precedes it
        f.seek(max(cd_end, 0))
        record = f.read(_ZIP64_EOCD.size)
        if cd_end < 0 or len(record) < _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
            return None
        entries, cd_size = _ZIP64_EOCD.unpack(record)[7:9]
    if cd_size > cd_end:
        return None
    f.seek(cd_end - cd_size)
    if entries and f.read(4) != b"PK\x01\x02":
        return None
    return cd_end - cd_size, cd_size


def _zip_entries(f: _Seekable, start: int, size: int) -> int:
    """How many entries the central directory at ``start`` holds (counted, not believed)."""
    f.seek(start)
    directory = f.read(size)
    count, at = 0, 0
    while at + _CD_ENTRY.size <= len(directory):
        fields = _CD_ENTRY.unpack_from(directory, at)
        if fields[0] != b"PK\x01\x02":
            break
        count += 1
        at += _CD_ENTRY.size + fields[10] + fields[11] + fields[12]
    return count


def _zip(f: _Seekable, scan: _Scan, depth: int) -> None:
    """Every entry of the zip archive ``f`` (whose raw bytes were scanned already)."""
    end = _zip_end(f)
    if end is None:
        raise Unscannable("corrupt zip archive (no central directory)")
    start, size = end
    # zipfile reads the whole directory into memory, and makes an object of each entry
    if size > _MAX_CENTRAL_DIRECTORY or \
            scan.entries + _zip_entries(f, start, size) > scan.limits.max_entries:
        raise Unscannable(f"it holds more than {scan.limits.max_entries} archive entries")
    try:
        with zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                scan.entry()
                _zip_entry(archive, info, scan, depth)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            ValueError, struct.error) as e:
        raise Unscannable("corrupt zip archive") from e


def _zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, scan: _Scan,
               depth: int) -> None:
    if info.flag_bits & 0x1:
        raise Unscannable("an entry of a zip archive is encrypted")
    if info.compress_type not in _ZIP_METHODS:
        raise Unscannable(f"a zip entry uses compression method {info.compress_type}")
    if info.is_dir() and not info.compress_size:
        return
    # read the entry's stored bytes and decompress them here: zipfile's own bzip2 and LZMA
    # readers decompress without an output bound
    raw = copy.copy(info)
    raw.compress_type, raw.file_size = zipfile.ZIP_STORED, info.compress_size
    if info.compress_type != zipfile.ZIP_STORED:
        del raw.CRC  # the CRC is of the decompressed bytes: checked below
    with archive.open(raw) as stored:
        raw_chunks = _file_chunks(stored)  # type: ignore[arg-type]
        if info.compress_type == zipfile.ZIP_STORED:
            body = _Source(raw_chunks, scan, scanned=False, charged=False)
        else:
            body = _Source(_zip_inflate(raw_chunks, info, scan), scan, scanned=True,
                           charged=True)
        _layer(body, scan, depth)


def _zip_inflate(raw: Iterator[bytes], info: zipfile.ZipInfo, scan: _Scan) -> Iterator[bytes]:
    """The decompressed bytes of a zip entry, checked against its size and CRC."""
    method = info.compress_type
    try:
        if method == zipfile.ZIP_DEFLATED:
            d: _Decompressor = _Zlib(-15)
        elif method == zipfile.ZIP_BZIP2:
            d = bz2.BZ2Decompressor()
        else:  # LZMA: a 4-byte header, then the properties of a raw LZMA1 stream
            head = next(raw, b"")
            if len(head) < 9:
                raise Unscannable("corrupt zip entry")
            size = int.from_bytes(head[2:4], "little")
            props = head[4:4 + size]
            d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[_lzma1(props)])
            raw = iter([head[4 + size:], *raw])
        total, crc = 0, 0
        data = b""
        while not d.eof:
            if not data and d.needs_input:
                data = next(raw, b"")
            out = d.decompress(data, CHUNK)
            total += len(out)
            if total > info.file_size:
                raise Unscannable("a zip entry is larger than it says")
            crc = zlib.crc32(out, crc)
            if out:
                yield out
            elif not data:  # no input left (LZMA may have no end marker)
                break
            data = b""
        if total != info.file_size or crc != info.CRC:
            raise Unscannable("corrupt zip entry")
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise Unscannable("corrupt zip entry") from e


def _lzma1(props: bytes) -> dict[str, int]:
    if len(props) != 5:
        raise Unscannable("corrupt zip entry")
    lc_lp_pb = props[0]
    return {"id": lzma.FILTER_LZMA1, "lc": lc_lp_pb % 9, "lp": (lc_lp_pb // 9) % 5,
            "pb": lc_lp_pb // 45, "dict_size": int.from_bytes(props[1:5], "little")}
