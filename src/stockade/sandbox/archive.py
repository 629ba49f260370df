"""The workspace archive that travels from ``stockade submit`` to a remote runner.

:func:`pack` writes what the workspace copy would copy (the same walk and excludes) as a
gzip'd POSIX (pax) tar; the server runs :func:`check` on the upload, writing nothing; the
runner runs :func:`unpack` into a fresh directory, which the workspace copy then copies into
the sandbox. gzip, because the archive crosses a network from a developer's machine and is
stored by the server (source trees shrink 3-4 times); level 3 is as fast as level 1 here and a
little smaller, and inflates at most 229 times. The bytes depend only on the tree (and zlib).

Everything in an archive is hostile. It is read by this module's own parser (``tarfile`` only
writes headers), which accepts only what :func:`pack` writes: one gzip member; ustar headers of
type ``0`` (file), ``5`` (directory) or ``2`` (symbolic link), each maybe after one ``x`` (pax)
header holding ``path``, ``linkpath``, ``size`` or ``hdrcharset`` that agree with the ustar
fields; entries depth first with the names of a directory sorted, so that an entry always
lies in the directory opened last (never under a link or a file, never twice) and only the
open directories are remembered; relative names without empty, ``.`` or ``..`` components
or control characters; link targets with leading ``..`` only (a ``..`` after a name could
leave the tree through another link: ``a/b -> ..`` then ``c -> a/b/..``) that stay inside;
no setuid, setgid or sticky bit; then two zero blocks and at most a record of zeros. Sizes
are counted on the bytes read (:class:`ArchiveLimits`); a header's claim is checked before its
data is read. A refusal is an :class:`ArchiveRefused` naming the entry, escaped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from stockade.errors import SandboxError, StockadeError, UsageError
from stockade.sandbox import workspace as ws
from stockade.sandbox.interface import WorkspaceSource

BLOCK = 512
RECORD = 20 * BLOCK  # the archive ends padded with zeros to whole records, as tar pads
CHUNK = 64 * 1024
LEVEL = 3
MAX_COMPONENT = 255
MAX_OCTAL = 8**11 - 1  # the largest size or mtime of a ustar header: pack needs no pax for them
ENTRY_OVERHEAD = 2048  # a header, a pax header for a long name, the padding of the data
RATIO_SLACK = 16 * 1024 * 1024  # more than zlib holds back before it writes anything
HINT = "only archives made by stockade's pack (stockade submit) are accepted"
PACK_HINT = f"{ws.EXCLUDE_HINT}, rename the path, or raise resources.workspace if it is too big"

_FILE, _DIR, _LINK = ws._FILE, ws._DIR, ws._LINK
_ZERO = bytes(BLOCK)
_KINDS = {b"0": _FILE, b"5": _DIR, b"2": _LINK}
_REFUSED = {b"1": "a hard link", b"3": "a character device", b"4": "a block device",
            b"6": "a FIFO", b"S": "a GNU sparse member", b"L": "a GNU long name",
            b"K": "a GNU long link", b"g": "a global pax header", b"x": "a second pax header"}
_PAX_KEYS = {b"path", b"linkpath", b"size", b"hdrcharset"}
_CONTROLS = bytes(range(0x20)) + b"\x7f"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveRefused(StockadeError):
    """The archive, or its entry ``entry`` (the name escaped and cut), is not one stockade
    accepts; ``problem`` says why."""

    exit_code = 2

    def __init__(self, problem: str, entry: bytes | None = None) -> None:
        self.entry = None if entry is None else _shown(entry)
        self.problem = problem
        where = "archive" if self.entry is None else f"archive entry '{self.entry}'"
        super().__init__(f"{where}: {problem}", hint=HINT)


class ArchiveLimits(NamedTuple):
    """What an archive may hold: ``max_bytes`` of file data (the job's workspace limit),
    ``max_entries`` files, links and directories (as the workspace copy), names of
    ``max_name`` bytes; and it may inflate ``max_ratio`` times (plus :data:`RATIO_SLACK`)."""

    max_bytes: int = 1024**3
    max_entries: int = ws.MAX_ENTRIES
    max_name: int = ws.MAX_PATH
    max_ratio: int = 300

    @classmethod
    def for_workspace(cls, workspace_bytes: int) -> ArchiveLimits:
        """The limits for a job whose workspace may hold ``workspace_bytes``."""
        return cls(max_bytes=workspace_bytes)

    @property
    def max_stream(self) -> int:
        """The most bytes the archive may take, compressed or inflated."""
        return self.max_bytes + self.max_entries * ENTRY_OVERHEAD + RECORD


class ArchiveInfo(NamedTuple):
    """An archive: the sha256 (hex) and ``size`` of its bytes, its ``files`` (regular files
    and links, as the workspace copy counts them) and the ``bytes`` of their data."""

    sha256: str
    size: int
    files: int
    bytes: int


class _Member(NamedTuple):
    name: bytes  # no trailing '/'
    kind: str
    mode: int
    mtime: int
    size: int = 0
    target: bytes = b""


class _Open:
    """A directory of the tree whose entries may still come, and its last entry so far."""

    def __init__(self, path: bytes) -> None:
        self.path, self.last, self.kind = path, "", _DIR


class _Tree:
    """The checks on each entry in archive order, and what the entries hold."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits, self.open = limits, [_Open(b"")]
        self.entries = self.files = self.bytes = 0

    def add(self, m: _Member) -> None:
        """Account for ``m``; ArchiveRefused if it is not acceptable where it comes."""
        if self.entries >= self.limits.max_entries:
            raise ArchiveRefused(f"more than {self.limits.max_entries} entries", m.name)
        problem = _name_problem(m.name, self.limits) or self._problem(m) or self._place(m)
        if problem:
            raise ArchiveRefused(problem, m.name)
        self.entries, self.files = self.entries + 1, self.files + (m.kind != _DIR)
        self.bytes += m.size

    def _problem(self, m: _Member) -> str | None:
        if m.mode & ~0o777:
            return f"mode {m.mode:o} has setuid, setgid or sticky bits"
        if m.kind == _FILE and m.size > min(self.limits.max_bytes - self.bytes, MAX_OCTAL):
            return f"its {m.size} bytes take the files past {self.limits.max_bytes} bytes"
        if m.kind != _FILE and m.size:
            return f"a {m.kind} with {m.size} bytes of data"
        return _target_problem(m, self.limits) if m.kind == _LINK else None

    def _place(self, m: _Member) -> str | None:
        """Depth first and sorted: the parent is the directory opened last (not a link, a
        file or a directory closed already), and the name follows its last sibling."""
        parts = m.name.split(b"/")
        depth, parent = len(parts) - 1, b"/".join(parts[:-1])
        if depth >= len(self.open) or self.open[depth].path != parent:
            up = self.open[depth - 1] if 0 < depth <= len(self.open) else None
            if (up and up.kind != _DIR and up.path == b"/".join(parts[:-2])
                    and up.last == os.fsdecode(parts[-2])):
                what = "symbolic link" if up.kind == _LINK else "file"
                return f"it lies under the {what} '{_shown(parent)}'"
            return (f"its directory '{_shown(parent)}' is not the one open here: a directory "
                    "must come before its entries, its entries together")
        del self.open[depth + 1:]
        level, leaf = self.open[depth], os.fsdecode(parts[-1])
        if leaf <= level.last:
            return "it appears twice" if leaf == level.last else "it is out of (sorted) order"
        level.last, level.kind = leaf, m.kind
        if m.kind == _DIR:
            self.open.append(_Open(m.name))
        return None


def _name_problem(name: bytes, limits: ArchiveLimits) -> str | None:
    parts = name.split(b"/")
    return next((why for bad, why in (
        (name.startswith(b"/"), "the name is absolute"),
        (len(name) > limits.max_name, f"the name is longer than {limits.max_name} bytes"),
        (len(name.translate(None, _CONTROLS)) < len(name), "the name holds a control character"),
        (b".." in parts, "the name has a '..' component"),
        (b"" in parts or b"." in parts, "the name is empty or has an empty or '.' component"),
        (len(parts) > ws.MAX_DEPTH + 1, f"the name nests more than {ws.MAX_DEPTH} directories"),
        (max(map(len, parts)) > MAX_COMPONENT, f"a component is longer than {MAX_COMPONENT} bytes"),
    ) if bad), None)


def _target_problem(m: _Member, limits: ArchiveLimits) -> str | None:
    target, shown = m.target, _shown(m.target)
    if not target or len(target) > limits.max_name:
        return f"the link target is empty or longer than {limits.max_name} bytes"
    if len(target.translate(None, _CONTROLS)) < len(target):
        return f"the link target '{shown}' holds a control character"
    if target.startswith(b"/"):
        return f"the link target '{shown}' is absolute"
    depth, named = m.name.count(b"/"), False  # the directories above the link
    for part in target.split(b"/"):
        if part == b".." and named:
            return f"the link target '{shown}' has a '..' after a name"
        depth -= part == b".."
        named = named or part not in (b"", b".", b"..")
        if depth < 0:
            return f"the link target '{shown}' points outside the archive's tree"
    return None


# --- reading -----------------------------------------------------------------------------

class _Inflate:
    """The tar bytes of a gzip'd archive: read once, hashed, counted and bounded."""

    def __init__(self, raw: BinaryIO, limits: ArchiveLimits) -> None:
        self._raw, self._limits = raw, limits
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip only
        self.sha, self.size, self.inflated = hashlib.sha256(), 0, 0
        self._buf, self._at = b"", 0

    def _read_raw(self) -> bytes:
        data = self._raw.read(CHUNK)
        self.sha.update(data)
        self.size += len(data)
        if self.size > self._limits.max_stream:
            raise ArchiveRefused(f"it is larger than {self._limits.max_stream} bytes")
        return data

    def _pull(self) -> bytes:
        """The next tar bytes; b"" at the end of the gzip stream."""
        limit, ratio = self._limits.max_stream, self._limits.max_ratio
        while not self._z.eof:
            data = self._z.unconsumed_tail or self._read_raw()
            if not data:
                raise ArchiveRefused("it is truncated (the gzip stream does not end)")
            try:
                piece = self._z.decompress(data, CHUNK)
            except zlib.error as e:
                raise ArchiveRefused(f"not gzip data, or corrupt ({e})") from e
            self.inflated += len(piece)
            if self.inflated > limit:
                raise ArchiveRefused(f"it inflates to more than {limit} bytes")
            if self.inflated > ratio * self.size + RATIO_SLACK:
                raise ArchiveRefused(f"it inflates more than {ratio} times (a bomb?)")
            if piece:
                return piece
        return b""

    def chunks(self, n: int) -> Iterator[bytes]:
        """The next ``n`` bytes, a piece at a time; ArchiveRefused if the stream ends first."""
        while n > 0:
            if self._at == len(self._buf):
                self._buf, self._at = self._pull(), 0
                if not self._buf:
                    raise ArchiveRefused("it is truncated (the tar stream ends early)")
            piece = self._buf[self._at:self._at + n]
            self._at, n = self._at + len(piece), n - len(piece)
            yield piece

    def read(self, n: int) -> bytes:
        """Exactly the next ``n`` bytes."""
        return b"".join(self.chunks(n))

    def pad(self, size: int, name: bytes) -> None:
        """The zeros that fill the last block of ``size`` bytes of data."""
        if self.read(-size % BLOCK).strip(b"\0"):
            raise ArchiveRefused("data in the padding after its data", name)

    def finish(self) -> None:
        """After the first zero block: zeros only (a block, and a record's padding at
        most), then the end of the gzip stream and of the input."""
        zeros = BLOCK
        while piece := self._buf[self._at:] or self._pull():
            self._at, zeros = len(self._buf), zeros + len(piece)
            if piece.strip(b"\0"):
                raise ArchiveRefused("data after the end of the tar archive")
            if zeros > RECORD + BLOCK:
                raise ArchiveRefused(f"more than {RECORD + BLOCK} zero bytes at the end")
        if zeros < 2 * BLOCK:
            raise ArchiveRefused("it is truncated (a closing zero block is missing)")
        if self._z.unused_data or self._read_raw():
            raise ArchiveRefused("data after the end of the gzip stream")


def _octal(field: bytes, name: bytes) -> int:
    digits = field.strip(b" \0")
    if not digits or digits.strip(b"01234567"):
        raise ArchiveRefused(f"a header number is not octal ({_shown(field)})", name)
    return int(digits, 8)


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
            raise ArchiveRefused("a malformed pax header", name)
        records[key], at = value, end
    return records


def _overridden(field: bytes, pax: dict[bytes, bytes], key: bytes, name: bytes) -> bytes:
    """The pax value for ``key`` if the ustar ``field`` holds what pack (tarfile) writes
    then: the value cut to 100 bytes, non-ASCII characters as '?'; else ``field``."""
    if key not in pax:
        return field
    if field != os.fsdecode(pax[key]).encode("ascii", "replace")[:100]:
        raise ArchiveRefused(f"its pax {key.decode()} disagrees with its header", name)
    return pax[key]


def _header(block: bytes) -> bytes:
    """The name in a header ``block`` whose magic and checksum are right."""
    field, prefix = block[:100].split(b"\0", 1)[0], block[345:500].split(b"\0", 1)[0]
    name = prefix + b"/" + field if prefix else field
    if block[257:265] != b"ustar\x0000":
        raise ArchiveRefused("not a POSIX (ustar) tar header", name)
    if _octal(block[148:156], name) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise ArchiveRefused("the header's checksum is wrong", name)
    return name


def _member(block: bytes, pax: dict[bytes, bytes]) -> _Member:
    """The entry of a header ``block`` (after a pax header ``pax``)."""
    name = _overridden(_header(block), pax, b"path", _header(block))
    kind, size = _KINDS.get(block[156:157]), _octal(block[124:136], name)
    if kind is None:
        what = _REFUSED.get(block[156:157], f"an entry of type '{_shown(block[156:157])}'")
        raise ArchiveRefused(f"{what} (only files, directories and symbolic links)", name)
    if unknown := sorted(set(pax) - _PAX_KEYS):
        sparse = "a GNU sparse member: " if unknown[0].startswith(b"GNU.sparse") else ""
        raise ArchiveRefused(f"{sparse}pax key '{_shown(unknown[0])}' is not accepted", name)
    if pax.get(b"hdrcharset", b"BINARY") != b"BINARY":  # all tarfile writes: names as bytes
        raise ArchiveRefused("an unknown pax hdrcharset", name)
    if pax.get(b"size", b"%d" % size) != b"%d" % size:
        raise ArchiveRefused(f"its pax size '{_shown(pax[b'size'])}' disagrees with its "
                             f"header's {size}", name)
    target = _overridden(block[157:257].split(b"\0", 1)[0], pax, b"linkpath", name)
    if target and kind != _LINK:
        raise ArchiveRefused(f"a {kind} with a link target", name)
    return _Member(name.removesuffix(b"/") if kind == _DIR else name, kind,
                   _octal(block[100:108], name), _octal(block[136:148], name), size, target)


def _next(src: _Inflate, limits: ArchiveLimits) -> _Member | None:
    """The next entry (its data not read yet), or None at the end of the archive."""
    block = src.read(BLOCK)
    if block == _ZERO:
        src.finish()
        return None
    if block[156:157] != b"x":
        return _member(block, {})
    name = _header(block)
    size = _octal(block[124:136], name)
    if size > 2 * limits.max_name + BLOCK:
        raise ArchiveRefused(f"a pax header of {size} bytes", name)
    pax = _pax(src.read(size), name)
    src.pad(size, name)
    block = src.read(BLOCK)
    if block == _ZERO:
        raise ArchiveRefused("a pax header without an entry after it", name)
    return _member(block, pax)


def _read(raw: BinaryIO, limits: ArchiveLimits, out: _Writer | None) -> ArchiveInfo:
    src, tree = _Inflate(raw, limits), _Tree(limits)
    while (m := _next(src, limits)) is not None:
        tree.add(m)
        data = src.chunks(m.size)
        if out is not None:
            out.add(m, data)
        for _ in data:  # what the writer did not take: all of it when only checking
            pass
        src.pad(m.size, m.name)
    return ArchiveInfo(src.sha.hexdigest(), src.size, tree.files, tree.bytes)


def check(stream: BinaryIO, limits: ArchiveLimits) -> ArchiveInfo:
    """Read the archive in ``stream`` once, writing nothing; what it holds, or ArchiveRefused
    for anything :func:`pack` would not have written or ``limits`` do not allow."""
    return _read(stream, limits, None)


# --- unpacking ---------------------------------------------------------------------------

class _Writer:
    """Creates each entry by its last component in the directory it created just before,
    through that directory's descriptor: no path is ever resolved, no link followed."""

    def __init__(self, root: int) -> None:
        self.dirs: list[tuple[bytes, int, _Member | None]] = [(b"", root, None)]

    def add(self, m: _Member, data: Iterator[bytes]) -> None:
        """Create ``m`` with the contents ``data``."""
        parent, _, leaf = m.name.rpartition(b"/")
        self.close(m.name.count(b"/") + 1)
        path, fd, _ = self.dirs[-1]
        if path != parent:
            raise ArchiveRefused("its directory is not the one being unpacked", m.name)
        try:
            if m.kind == _DIR:
                os.mkdir(leaf, 0o700, dir_fd=fd)
                self.dirs.append((m.name, os.open(leaf, ws._DIR_FLAGS, dir_fd=fd), m))
            elif m.kind == _LINK:
                os.symlink(m.target, leaf, dir_fd=fd)
                os.utime(leaf, (m.mtime, m.mtime), dir_fd=fd, follow_symlinks=False)
            else:
                out = os.open(leaf, _NEW_FILE, 0o600, dir_fd=fd)
                try:
                    for piece in data:
                        view = memoryview(piece)
                        while view:
                            view = view[os.write(out, view):]
                    _finish(out, m)
                finally:
                    os.close(out)
        except OSError as e:
            raise SandboxError(f"cannot unpack '{_shown(m.name)}': {e.strerror}") from e

    def close(self, depth: int = 1, finish: bool = True) -> None:
        """Close the directories below ``depth``, their modes and times set if ``finish``."""
        while len(self.dirs) > depth:
            _, fd, m = self.dirs.pop()
            try:
                if finish and m is not None:
                    _finish(fd, m)
            finally:
                os.close(fd)


def _finish(fd: int, m: _Member) -> None:
    os.fchmod(fd, m.mode & 0o755)
    os.utime(fd, (m.mtime, m.mtime))


def _open_dest(dest: Path) -> int:
    """``dest``, made 0700: a new directory or an empty one (not a link)."""
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(dest, 0o700)
        fd = os.open(dest, ws._DIR_FLAGS)
    except OSError as e:
        raise SandboxError(f"cannot unpack into {ws._excerpt(str(dest))}: {e.strerror}") from e
    if os.listdir(fd):
        os.close(fd)
        raise SandboxError(f"cannot unpack into {ws._excerpt(str(dest))}: it is not empty")
    os.fchmod(fd, 0o700)
    return fd


def unpack(archive_path: Path, dest: Path, limits: ArchiveLimits, sha256: str) -> ArchiveInfo:
    """Unpack the archive at ``archive_path``, whose sha256 must be ``sha256``, into ``dest``
    (created 0700, or empty), checking everything as :func:`check` does: directories, files
    and links only, modes masked with 0o755, times kept, owned by the caller. After a refusal
    ``dest`` holds what was unpacked before it: the caller removes it."""
    try:
        with open(archive_path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limits.max_stream:
                raise ArchiveRefused(f"it is larger than {limits.max_stream} bytes")
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != sha256.lower():
                raise ArchiveRefused(f"its sha256 is {digest}, not {_shown(sha256.encode())}")
            f.seek(0)
            root = _open_dest(dest)
            writer = _Writer(root)
            try:
                info = _read(f, limits, writer)
                writer.close()
            finally:
                writer.close(finish=False)
                os.close(root)
    except OSError as e:  # reading the runner's own file (what the writer does is translated)
        raise SandboxError(f"cannot read the archive {archive_path}: {e.strerror}") from e
    if info.sha256 != digest:
        raise ArchiveRefused("the archive changed while it was unpacked")
    return info


# --- packing -----------------------------------------------------------------------------

class _Sink:
    """The tar stream, compressed, hashed, counted and bounded on its way to ``out``."""

    def __init__(self, out: BinaryIO, limits: ArchiveLimits) -> None:
        self._out, self._limits = out, limits
        self._z = zlib.compressobj(LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self.sha, self.tar, self.size = hashlib.sha256(), 0, 0

    def write(self, data: bytes) -> None:
        """Add tar bytes."""
        self.tar += len(data)
        self._emit(self._z.compress(data))

    def close(self) -> None:
        """The end of the archive: its zero blocks and padding, then the end of gzip."""
        self.write(bytes(2 * BLOCK + (-(self.tar + 2 * BLOCK) % RECORD)))
        self._emit(self._z.flush())

    def _emit(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self._out.write(data)
        limit, ratio = self._limits.max_stream, self._limits.max_ratio
        if max(self.tar, self.size) > limit:
            raise UsageError(f"the workspace archive would be larger than {limit} bytes",
                             hint=PACK_HINT)
        if self.tar > ratio * self.size + RATIO_SLACK:  # as check() counts, a little stricter
            raise UsageError(f"the workspace archive would inflate more than {ratio} times, "
                             "which remote runners refuse as a decompression bomb",
                             hint=f"exclude large runs of identical bytes; {ws.EXCLUDE_HINT}")


def pack(source: WorkspaceSource, out: BinaryIO, limit_bytes: int) -> ArchiveInfo:
    """Write the workspace ``source`` (minus its excludes; files, directories and links, none
    followed) to ``out`` as an archive that :func:`check` accepts, deterministically: names
    sorted, whole-second mtimes, owner 0, no setuid, setgid or sticky bits. UsageError if it
    holds more than ``limit_bytes`` of data or anything a runner would refuse."""
    where = ws._excerpt(str(source.path))
    try:
        root, rules = ws._open_root(source)
    except OSError as e:
        raise UsageError(f"cannot read the workspace {where}: {e.strerror}",
                         hint="pass a readable directory") from e
    limits = ArchiveLimits.for_workspace(limit_bytes)
    sink, tree = _Sink(out, limits), _Tree(limits)
    try:
        for entry in ws._walk(root, rules):
            if entry.kind != ws._END:
                _pack_entry(sink, tree, entry)
        sink.close()
    except ArchiveRefused as e:
        raise UsageError(f"workspace {where}: {e.entry}: {e.problem} (a runner would refuse "
                         "it)", hint=PACK_HINT) from e
    except OSError as e:
        file = f" ({ws._excerpt(os.fsdecode(e.filename))})" if e.filename else ""
        raise UsageError(f"cannot read the workspace {where}: {e.strerror}{file}",
                         hint=PACK_HINT) from e
    finally:
        os.close(root)
    return ArchiveInfo(sink.sha.hexdigest(), sink.size, tree.files, tree.bytes)


def _pack_entry(sink: _Sink, tree: _Tree, e: ws._Entry) -> None:
    if e.kind != _FILE:
        target = os.readlink(e.name, dir_fd=e.parent_fd) if e.kind == _LINK else ""
        _add_header(sink, tree, e.rel, e.kind, e.st, target)
        return
    try:
        fd = os.open(e.name, ws._READ_FLAGS, dir_fd=e.parent_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOENT):
            return  # swapped for a link, or removed, while read: left out, as by the copy
        raise
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        _add_header(sink, tree, e.rel, _FILE, st, "")
        left = st.st_size
        while left and (piece := f.read(min(left, CHUNK))):
            sink.write(piece)
            left -= len(piece)
        if left:
            raise UsageError(f"{ws._excerpt(e.rel)} shrank while the workspace was packed",
                             hint="pack a workspace that nothing is writing to")
        sink.write(bytes(-st.st_size % BLOCK))


def _add_header(sink: _Sink, tree: _Tree, rel: str, kind: str, st: os.stat_result,
                target: str) -> None:
    mtime = min(max(st.st_mtime_ns // 10**9, 0), MAX_OCTAL)
    mode, size = stat.S_IMODE(st.st_mode) & 0o777, st.st_size if kind == _FILE else 0
    tree.add(_Member(os.fsencode(rel), kind, mode, mtime, size, os.fsencode(target)))
    info = tarfile.TarInfo(rel)
    info.type = {_FILE: tarfile.REGTYPE, _DIR: tarfile.DIRTYPE, _LINK: tarfile.SYMTYPE}[kind]
    info.mode, info.mtime, info.size, info.linkname = mode, mtime, size, target
    sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


def _shown(name: bytes) -> str:
    return ws._excerpt(os.fsdecode(name))
