"""Reading one OCI image layer: its bytes inflated, hashed, counted and bounded, and its tar
headers parsed strictly, one entry at a time (:mod:`stockade.image.layers` applies them).

A layer is hostile: it comes from whatever image a job names. Python's ``tarfile`` reads a
pax or GNU long-name header of any declared size into memory and follows no bound we set, so
this module parses the headers itself, accepting what image builders write: POSIX ustar and
pax, GNU (``L``/``K`` long names and links, base-256 numbers), old-style regular files (type
``\\0``, ``7``; a name ending in ``/`` is a directory, as Go reads it), one of each extension
header before an entry, global pax headers ignored (as containerd does). Of the pax records
only ``path``, ``linkpath``, ``size`` and ``mtime`` are used; owners, xattrs, times other than
the mtime are ignored; GNU sparse members, multi-volume, V7 and unknown headers are refused.

Names are made safe here, once: a leading ``/`` (absolute names) and ``.`` or empty
components are dropped, because a layer's root *is* the image's root and tools write
``./etc`` as often as ``etc``; a ``..`` component, a control character (NUL included), a name
over :attr:`LayerLimits.max_name` bytes or deeper than ``max_depth`` is refused, never
resolved. Every size is checked before it is read: an extension header against
:data:`MAX_META`, a file against ``max_file`` and against what is left of ``max_bytes``; the
tar stream may not grow past ``max_bytes`` nor inflate more than ``max_ratio`` times (plus
``ratio_slack``), so a decompression bomb stops after a few megabytes. The tar stream ends
with two zero blocks and nothing but zeros after them. Its sha256 over every byte is the
layer's DiffID; the sha256 of the bytes read is its digest.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

from stockade.image.errors import ImageRefused
from stockade.text import escape_controls

BLOCK = 512
CHUNK = 64 * 1024
MAX_COMPONENT = 255
MAX_META = 1024 * 1024  # one pax or GNU long-name header: names, links and (ignored) xattrs
MAX_SHOWN = 160
MAX_MTIME = 2**32 - 1  # 2106: what every file system here stores
HINT = "the image is refused; use an image built by a standard tool from trusted content"

FILE, DIR, SYMLINK, HARDLINK = "file", "directory", "symbolic link", "hard link"
CHAR, BLOCKDEV, FIFO = "character device", "block device", "FIFO"
SKIPPED = (CHAR, BLOCKDEV, FIFO)
MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

_ZERO = bytes(BLOCK)
_KINDS = {b"0": FILE, b"\0": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR,
          b"4": BLOCKDEV, b"5": DIR, b"6": FIFO}
_EXTENSIONS = {b"x": "pax", b"g": "global pax", b"L": "GNU long name", b"K": "GNU long link"}
_REFUSED = {b"S": "a GNU sparse member", b"V": "a volume label", b"M": "a multi-volume member",
            b"D": "a GNU dump directory", b"N": "an old GNU long name"}
_CONTROLS = bytes(range(0x20)) + b"\x7f"
_HIGH = bytes(range(0x80, 0x100))


def shown(name: bytes) -> str:
    """A name from a layer as a message may show it: escaped and cut."""
    text = os.fsdecode(name)
    cut = text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(name)} bytes)"
    return escape_controls(cut)


class LayerRefused(ImageRefused):
    """The layer, or its entry ``entry`` (escaped and cut), is not one stockade applies;
    ``problem`` says why. Nothing a refused layer wrote may be used."""

    def __init__(self, problem: str, entry: bytes | None = None) -> None:
        self.entry = None if entry is None else shown(entry)
        self.problem = problem
        where = "image layer" if self.entry is None else f"image layer entry '{self.entry}'"
        super().__init__(f"{where}: {problem}", hint=HINT)


class LayerLimits(NamedTuple):
    """What layers may hold: ``max_bytes`` of tar stream and ``max_entries`` entries (for one
    layer; :func:`~stockade.image.layers.unpack_image` counts them over the whole image),
    ``max_file`` bytes in one file, names of ``max_name`` bytes and ``max_depth``
    components; a compressed layer may inflate ``max_ratio`` times plus ``ratio_slack``."""

    max_bytes: int = 16 * 1024**3
    max_entries: int = 500_000
    max_file: int = 4 * 1024**3
    max_ratio: int = 200
    ratio_slack: int = 16 * 1024**2
    max_name: int = 4096
    max_depth: int = 256


class Member(NamedTuple):
    """One entry: ``raw`` is its name as the layer spells it (for messages), ``path`` the
    name made relative and clean (``b""`` is the root), ``target`` a symbolic link's target
    as stored or a hard link's target path, cleaned as names are."""

    raw: bytes
    path: bytes
    kind: str
    mode: int
    mtime: int
    size: int
    target: bytes


class _Counted:
    """The layer's bytes as read: hashed (the digest), counted and bounded."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw, self._limit = raw, limit
        self.sha, self.size = hashlib.sha256(), 0

    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` more bytes (b"" at the end)."""
        data = self._raw.read(min(n, CHUNK))
        self.sha.update(data)
        self.size += len(data)
        if self.size > self._limit:
            raise LayerRefused(f"it is larger than {self._limit} bytes")
        return data


class Source:
    """The tar stream of a layer: inflated, hashed (the DiffID), counted and bounded."""

    def __init__(self, raw: BinaryIO, media_type: str, limits: LayerLimits) -> None:
        compression = MEDIA_TYPES.get(media_type)
        if compression is None:
            raise LayerRefused(f"media type '{shown(media_type.encode())}' is not a layer "
                               f"type stockade applies ({', '.join(MEDIA_TYPES)})")
        self.raw, self.limits = _Counted(raw, limits.max_bytes + limits.ratio_slack), limits
        self.compressed = compression != "tar"
        self.diff, self.size = hashlib.sha256(), 0
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._zstd: Any = _zstd_reader(self.raw) if compression == "zstd" else None
        self._pull = {"tar": self.raw.read, "gzip": self._gunzip, "zstd": self._unzstd}[
            compression]
        self._buf, self._at = b"", 0

    def _gunzip(self) -> bytes:
        while True:
            if self._z.eof:  # the end of a gzip member: another may follow (as Go reads)
                data = self._z.unused_data or self.raw.read()
                if not data:
                    return b""
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = self._z.unconsumed_tail or self.raw.read()
                if not data:
                    raise LayerRefused("it is truncated (the gzip stream does not end)")
            try:
                piece = self._z.decompress(data, CHUNK)
            except zlib.error as e:
                raise LayerRefused(f"not gzip data, or corrupt ({e})") from e
            if piece:
                return piece

    def _unzstd(self) -> bytes:
        try:
            return bytes(self._zstd.read(CHUNK))
        except importlib.import_module("zstandard").ZstdError as e:
            raise LayerRefused(f"not zstd data, or corrupt ({e})") from e

    def _more(self) -> bytes:
        piece = self._pull()
        self.diff.update(piece)
        self.size += len(piece)
        limits = self.limits
        if self.size > limits.max_bytes:
            raise LayerRefused(f"its tar stream is larger than the {limits.max_bytes} bytes "
                               "left for it (LayerLimits.max_bytes counts the whole image)")
        if self.compressed and self.size > limits.max_ratio * self.raw.size + limits.ratio_slack:
            raise LayerRefused(f"it inflates more than {limits.max_ratio} times "
                               "(a decompression bomb?)")
        return piece

    def more(self) -> bytes:
        """The next piece of the tar stream past what was read (b"" at its end): to hash a
        whole layer without reading it as tar."""
        return self._more()

    @property
    def position(self) -> int:
        """How many bytes of the tar stream have been read so far."""
        return self.size - (len(self._buf) - self._at)

    def chunks(self, n: int) -> Iterator[bytes]:
        """The next ``n`` bytes, a piece at a time; LayerRefused if the stream ends first."""
        while n > 0:
            if self._at == len(self._buf):
                self._buf, self._at = self._more(), 0
                if not self._buf:
                    raise LayerRefused("it is truncated (the tar stream ends early)")
            piece = self._buf[self._at:self._at + n]
            self._at, n = self._at + len(piece), n - len(piece)
            yield piece

    def read(self, n: int) -> bytes:
        """Exactly the next ``n`` bytes."""
        return b"".join(self.chunks(n))

    def skip(self, n: int) -> None:
        """Pass over the next ``n`` bytes."""
        for _ in self.chunks(n):
            pass

    def finish(self) -> None:
        """After the first zero block: a second one, then zeros only to the end."""
        if self.read(BLOCK) != _ZERO:
            raise LayerRefused("a header after a zero block (a second zero block must end "
                               "the tar archive)")
        while piece := self._buf[self._at:] or self._more():
            self._at = len(self._buf)
            if piece.strip(b"\0"):
                raise LayerRefused("data after the end of the tar archive")


def _zstd_reader(raw: _Counted) -> Any:
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError as e:
        raise LayerRefused("zstd-compressed layers need the Python module 'zstandard', "
                           "which is not installed on this runner") from e
    # a frame may ask for a window of up to 2 GiB: 128 MiB is zstd's own default ceiling
    return zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(
        raw, read_size=CHUNK, read_across_frames=True)


# --- headers -------------------------------------------------------------------------------

def _number(field: bytes, name: bytes) -> int:
    """An octal or (GNU) base-256 number field."""
    if field[:1] and field[0] & 0x80:
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        return value - (1 << (8 * len(field) - 1)) if field[0] & 0x40 else value
    digits = field.strip(b" \0")
    if digits.strip(b"01234567"):
        raise LayerRefused(f"a header number is not octal ({shown(field)})", name)
    return int(digits, 8) if digits else 0


def _header_name(block: bytes) -> bytes:
    """The name in a header ``block`` whose magic and checksum are right."""
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX: a prefix (GNU headers hold times there)
        prefix = block[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    elif block[257:265] != b"ustar  \0":
        raise LayerRefused("not a ustar, pax or GNU tar header (corrupt, or V7 tar)", name)
    stored = _number(block[148:156], name)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    high = BLOCK - 8 - len(block[:148].translate(None, _HIGH) + block[156:].translate(None, _HIGH))
    if stored not in (unsigned, unsigned - 256 * high):
        raise LayerRefused("the header's checksum is wrong", name)
    return name


def _pax(data: bytes, name: bytes) -> dict[bytes, bytes]:
    """The records ``LENGTH KEY=VALUE\\n`` of a pax header, parsed strictly."""
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at, at + 20)
        length = data[at:space] if space > at else b""
        end = at + int(length) if length.isdigit() else -1
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if end <= space or end > len(data) or data[end - 1] != 0x0A or not eq or key in records:
            raise LayerRefused("a malformed pax header", name)
        if key.startswith(b"GNU.sparse"):
            raise LayerRefused("a GNU sparse member (pax GNU.sparse records)", name)
        records[key], at = value, end
    return records


def _pax_number(value: bytes, key: str, name: bytes) -> int:
    whole = value.split(b".", 1)[0]
    digits = whole.removeprefix(b"-")
    if not digits.isdigit() or len(digits) > 20:
        raise LayerRefused(f"its pax {key} '{shown(value)}' is not a number", name)
    return int(whole)


def clean(raw: bytes, limits: LayerLimits, what: str, entry: bytes) -> bytes:
    """``raw`` made relative, without ``.`` or empty components; LayerRefused for ``..``,
    control characters and names too long or too deep."""
    problem = None
    parts = [part for part in raw.split(b"/") if part not in (b"", b".")]
    if len(raw) > limits.max_name:
        problem = f"the {what} is longer than {limits.max_name} bytes"
    elif len(raw.translate(None, _CONTROLS)) < len(raw):
        problem = f"the {what} holds a control character (or NUL)"
    elif b".." in parts:
        problem = f"the {what} has a '..' component"
    elif len(parts) > limits.max_depth:
        problem = f"the {what} nests more than {limits.max_depth} directories"
    elif parts and max(map(len, parts)) > MAX_COMPONENT:
        problem = f"the {what} has a component longer than {MAX_COMPONENT} bytes"
    if problem:
        raise LayerRefused(problem, entry)
    return b"/".join(parts)


def _member(block: bytes, name: bytes, ext: dict[bytes, Any], limits: LayerLimits) -> Member:
    """The entry of a header ``block`` after the extension headers ``ext``."""
    pax: dict[bytes, bytes] = ext.get(b"x", {})
    raw = pax.get(b"path", ext.get(b"L", name))
    typeflag = block[156:157]
    kind = _KINDS.get(typeflag)
    if kind is None:
        what = _REFUSED.get(typeflag, f"an entry of unknown type '{shown(typeflag)}'")
        raise LayerRefused(f"{what} is not accepted in an image layer", raw)
    size = _number(block[124:136], raw)
    if b"size" in pax:
        size = _pax_number(pax[b"size"], "size", raw)
    mtime = _number(block[136:148], raw)
    if b"mtime" in pax:
        mtime = _pax_number(pax[b"mtime"], "mtime", raw)
    if kind == FILE and raw.endswith(b"/"):
        kind = DIR  # how old tars wrote directories (Go reads them so)
    if size < 0 or (kind != FILE and size):
        raise LayerRefused(f"a {kind} with a declared size of {size} bytes", raw)
    target = pax.get(b"linkpath", ext.get(b"K", block[157:257].split(b"\0", 1)[0]))
    if kind == HARDLINK:
        target = clean(target, limits, "hard link target", raw)
        if not target:
            raise LayerRefused("a hard link to the root directory", raw)
    elif kind == SYMLINK and (not target or len(target) > limits.max_name
                              or len(target.translate(None, _CONTROLS)) < len(target)):
        raise LayerRefused(f"the link target '{shown(target)}' is empty, longer than "
                           f"{limits.max_name} bytes or holds a control character", raw)
    mode = _number(block[100:108], raw) & 0o7777
    mtime = min(max(mtime, 0), MAX_MTIME)  # (the file system's range: no OverflowError)
    return Member(raw, clean(raw, limits, "name", raw), kind, mode, mtime, size,
                  target if kind in (SYMLINK, HARDLINK) else b"")


def _extension(src: Source, block: bytes, name: bytes) -> Any:
    """The value of an extension header: pax records, or a GNU long name or link."""
    size = _number(block[124:136], name)
    if not 0 <= size <= MAX_META:
        raise LayerRefused(f"a {_EXTENSIONS[block[156:157]]} header of {size} bytes "
                           f"(at most {MAX_META})", name)
    data = src.read(size)
    src.skip(-size % BLOCK)
    if block[156:157] in b"xg":
        return _pax(data, name)
    value, _, rest = data.partition(b"\0")
    if rest.strip(b"\0"):
        raise LayerRefused(f"its {_EXTENSIONS[block[156:157]]} holds a NUL", value)
    return value


def members(src: Source) -> Iterator[tuple[Member, Iterator[bytes]]]:
    """Each entry with its data (a file's bytes: what the caller does not read is skipped);
    LayerRefused for anything not accepted, or more than ``max_entries`` entries."""
    limits, count = src.limits, 0
    while True:
        ext: dict[bytes, Any] = {}
        block = src.read(BLOCK)
        while block != _ZERO and block[156:157] in _EXTENSIONS:
            name, flag = _header_name(block), block[156:157]
            if flag in ext:
                raise LayerRefused(f"two {_EXTENSIONS[flag]} headers before one entry", name)
            value = _extension(src, block, name)
            if flag != b"g":  # global pax headers are ignored, as containerd does
                ext[flag] = value
            block = src.read(BLOCK)
        if block == _ZERO:
            if ext:
                raise LayerRefused("an extension header without an entry after it")
            src.finish()
            return
        m = _member(block, _header_name(block), ext, limits)
        count += 1
        if count > limits.max_entries:
            raise LayerRefused(f"more than {limits.max_entries} entries", m.raw)
        if m.size > limits.max_file:
            raise LayerRefused(f"its declared size of {m.size} bytes is over the limit of "
                               f"{limits.max_file} bytes for one file", m.raw)
        if m.size > limits.max_bytes - src.position:
            raise LayerRefused(f"its declared size of {m.size} bytes takes the layer past "
                               f"{limits.max_bytes} bytes", m.raw)
        data = src.chunks(m.size)
        yield m, data
        for _ in data:
            pass
        src.skip(-m.size % BLOCK)
