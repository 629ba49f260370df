"""Applying OCI image layers onto a directory tree, and unpacking a whole image into the cache.

:func:`apply_layer` applies one layer (tar, tar+gzip, tar+zstd when the ``zstandard`` module
is importable; read by :mod:`stockade.image.tarstream`) onto a tree that holds the layers
below it, by the OCI image-spec rules, as root, with the layer treated as hostile:

- Nothing is ever followed. Every path is walked a component at a time from the root's
  descriptor with ``O_DIRECTORY | O_NOFOLLOW``; each entry is created by its last component in
  its parent's descriptor, new files with ``O_CREAT | O_EXCL | O_NOFOLLOW``. An existing
  entry is removed, never opened for writing, so a write cannot go through a hard link either.
  An entry under a symbolic link or a file (``a -> /etc`` then ``a/passwd``, from this layer
  or a lower one) is refused. Missing parents are created (0755), as other unpackers do,
  and count as entries.
- Names: absolute names are made relative (a layer's root is the image's root) and ``.`` or
  empty components dropped; ``..`` components, control characters, over-long or too deep names
  are refused. The root entry (``./``) is ignored: the tree's top stays as the caller made it.
- Whiteouts: ``.wh.NAME`` removes NAME as lower layers left it; ``.wh..wh..opq`` removes what
  lower layers had in its directory. Neither touches what this same layer adds, whatever the
  order of the entries: the layer's own paths (and their parents) are remembered and kept.
  A whiteout under a link or a file whites out nothing (the path does not exist in the
  image); one naming ``.``, ``..`` or nothing is refused; other ``.wh..wh.`` (aufs) metadata
  is skipped.
- Kinds: files, directories, symbolic links (any target, stored as it is: it is followed
  only inside the job's sandbox) and hard links (to an entry already in the tree, not a
  directory, not the link itself or something under it). Character and block devices and
  FIFOs are skipped and counted (tar cannot hold sockets).
- Metadata: owners in the tar are ignored (every file belongs to the user unpacking, root:
  the image's own uids have no meaning on the host, and a job runs as its own uid anyway);
  setuid, setgid and sticky bits are dropped (and counted); other mode bits and mtimes are
  kept (a directory's when the layer ends, after its entries); xattrs are ignored.

Limits (:class:`LayerLimits`) bound entries, the tar stream, one file and the inflation ratio;
a refusal is a :class:`LayerRefused` naming the entry (escaped) and what is wrong; a failure of
the host (a full disk) is an :class:`UnpackError`. A refused layer leaves a half-applied tree:
:func:`unpack_image` applies the layers into a fresh directory, checks each DiffID, and
publishes the tree with one atomic rename, or removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from stockade.errors import InfrastructureError
from stockade.image import tarstream as ts
from stockade.image.tarstream import LayerLimits, LayerRefused, Member

__all__ = ["LayerInfo", "LayerLimits", "LayerRefused", "UnpackError", "apply_layer",
           "layer_diff_id", "unpack_image"]

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")
DEFAULT_LIMITS = LayerLimits()


class UnpackError(InfrastructureError):
    """The host could not write the image's tree (a full disk, a missing cache directory)."""


class LayerInfo(NamedTuple):
    """An applied layer: ``diff_id`` (``sha256:`` of its tar stream, to check against the
    image config), ``digest`` and ``size`` of the bytes read, ``tar_size``, ``entries`` (and
    the directories they imply), the ``files`` (and hard links) and ``bytes`` written,
    ``whiteouts`` applied, entries ``skipped`` (devices, FIFOs, aufs metadata) and modes
    ``stripped`` of setuid, setgid or sticky bits."""

    diff_id: str
    digest: str
    size: int
    tar_size: int
    entries: int
    files: int
    bytes: int
    whiteouts: int
    skipped: int
    stripped: int


def _join(parent: bytes, leaf: bytes) -> bytes:
    return parent + b"/" + leaf if parent else leaf


def _lstat(fd: int, leaf: bytes) -> os.stat_result | None:
    try:
        return os.lstat(leaf, dir_fd=fd)
    except FileNotFoundError:
        return None


def _remove(fd: int, leaf: bytes, st: os.stat_result) -> None:
    """Remove ``leaf`` (a whole directory, without following any link in it)."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(leaf, dir_fd=fd)
    else:
        os.unlink(leaf, dir_fd=fd)


class _Paths:
    """The paths a layer adds (its entries and their parents) as a tree of ids: each costs
    its last component, whatever its depth, so memory follows the tar's size."""

    def __init__(self) -> None:
        self.ids: dict[tuple[int, bytes], int] = {}
        self.nodes: list[tuple[int, bytes]] = [(0, b"")]  # id: (parent id, name); 0: root

    def add(self, path: bytes) -> int:
        """The id of ``path``, added with its parents."""
        node = 0
        for part in path.split(b"/"):
            found = self.ids.get((node, part))
            if found is None:
                found = self.ids[node, part] = len(self.nodes)
                self.nodes.append((node, part))
            node = found
        return node

    def find(self, path: bytes) -> int | None:
        """The id of ``path`` if the layer added it."""
        node: int | None = 0
        for part in path.split(b"/") if path else ():
            node = self.ids.get((node, part)) if node is not None else None
        return node

    def path(self, node: int) -> bytes:
        """The path of ``node``."""
        parts = []
        while node:
            node, name = self.nodes[node]
            parts.append(name)
        return b"/".join(reversed(parts))


class _Layer:
    """One layer being applied onto the tree at the descriptor ``root``."""

    def __init__(self, root: int, limits: LayerLimits) -> None:
        self.root, self.limits = root, limits
        self.paths = _Paths()  # what this layer adds: kept by its whiteouts
        self.dirs: dict[int, tuple[int, int]] = {}  # mode and time, set when the layer ends
        self.entries = self.files = self.bytes = 0
        self.whiteouts = self.skipped = self.stripped = 0
        self._parent: tuple[bytes, int] | None = None  # the last parent opened, reused

    def close(self) -> None:
        """Close the descriptor kept open."""
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def walk(self, path: bytes, creating: Member | None) -> int | None:
        """A new descriptor of the directory ``path``, no link followed. When ``creating``
        an entry, missing directories are made and a link or file on the way is refused;
        else None when ``path`` is not a directory of the tree."""
        fd, done = os.dup(self.root), b""
        try:
            for part in path.split(b"/") if path else ():
                done = _join(done, part)
                try:
                    below = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        raise
                    if creating is None:
                        os.close(fd)
                        return None
                    below = self._make_parent(fd, part, done, creating)
                os.close(fd)
                fd = below
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_parent(self, fd: int, part: bytes, done: bytes, m: Member) -> int:
        st = _lstat(fd, part)
        if st is not None:
            what = "symbolic link" if stat.S_ISLNK(st.st_mode) else "non-directory"
            raise LayerRefused(f"it lies under the {what} '{ts.shown(done)}'", m.raw)
        self.entries += 1  # a directory too, for the limit
        if self.entries > self.limits.max_entries:
            raise LayerRefused(f"more than {self.limits.max_entries} entries (with the "
                               "directories that entries imply)", m.raw)
        os.mkdir(part, 0o755, dir_fd=fd)
        return os.open(part, _DIR_FLAGS, dir_fd=fd)

    def parent(self, path: bytes, m: Member) -> int:
        """The descriptor of directory ``path`` (kept open until another is asked for)."""
        if self._parent is None or self._parent[0] != path:
            fd = self.walk(path, m)
            assert fd is not None
            self.close()
            self._parent = (path, fd)
        return self._parent[1]

    def _clear(self, fd: int, leaf: bytes, keep_dir: bool = False) -> bool:
        """Remove what is at ``leaf`` (unless a directory and ``keep_dir``); whether a
        directory is there now."""
        st = _lstat(fd, leaf)
        if st is None:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        _remove(fd, leaf, st)  # the descriptor kept is ``fd``, above what goes: still valid
        return False

    def add(self, m: Member, data: Iterator[bytes]) -> None:
        """Apply the entry ``m`` with the contents ``data``."""
        self.entries += 1
        parent, _, leaf = m.path.rpartition(b"/")
        if not m.path:
            return  # the root: its metadata is the caller's
        if leaf.startswith(WHITEOUT):
            self._whiteout(m, parent, leaf)
            return
        if m.kind in ts.SKIPPED:
            self.skipped += 1
            return
        fd = self.parent(parent, m)
        node = self.paths.add(m.path)
        if m.mode & 0o7000 and m.kind in (ts.FILE, ts.DIR):
            self.stripped += 1
        if m.kind == ts.DIR:
            if not self._clear(fd, leaf, keep_dir=True):
                os.mkdir(leaf, 0o700, dir_fd=fd)
            self.dirs[node] = (m.mode & 0o777, m.mtime)
        elif m.kind == ts.SYMLINK:
            self._clear(fd, leaf)
            os.symlink(m.target, leaf, dir_fd=fd)
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=fd, follow_symlinks=False)
        elif m.kind == ts.HARDLINK:
            self._hardlink(fd, leaf, m)
        else:
            self._clear(fd, leaf)
            self._write(fd, leaf, m, data)

    def _write(self, fd: int, leaf: bytes, m: Member, data: Iterator[bytes]) -> None:
        out = os.open(leaf, _NEW_FILE, 0o600, dir_fd=fd)
        try:
            for piece in data:
                view = memoryview(piece)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, m.mode & 0o777)
            os.utime(out, (m.mtime, m.mtime))
        finally:
            os.close(out)
        self.files, self.bytes = self.files + 1, self.bytes + m.size

    def _hardlink(self, fd: int, leaf: bytes, m: Member) -> None:
        if m.target == m.path or m.target.startswith(m.path + b"/"):
            raise LayerRefused(f"a hard link to itself or to '{ts.shown(m.target)}' under "
                               "it", m.raw)
        source_parent, _, source_leaf = m.target.rpartition(b"/")
        source = self.walk(source_parent, None)
        try:
            st = None if source is None else _lstat(source, source_leaf)
            if source is None or st is None:
                raise LayerRefused(f"a hard link to '{ts.shown(m.target)}', which is not in "
                                   "the tree (yet)", m.raw)
            if stat.S_ISDIR(st.st_mode):
                raise LayerRefused(f"a hard link to the directory '{ts.shown(m.target)}'",
                                   m.raw)
            self._clear(fd, leaf)
            os.link(source_leaf, leaf, src_dir_fd=source, dst_dir_fd=fd,
                    follow_symlinks=False)
        finally:
            if source is not None:
                os.close(source)
        self.files += 1

    def _whiteout(self, m: Member, parent: bytes, leaf: bytes) -> None:
        self.whiteouts += 1
        if leaf == OPAQUE:
            self._prune(parent)
            return
        name = leaf.removeprefix(WHITEOUT)
        if name.startswith(WHITEOUT):  # aufs metadata (.wh..wh.plnk ...): not a whiteout
            self.whiteouts, self.skipped = self.whiteouts - 1, self.skipped + 1
            return
        if name in (b"", b".", b".."):
            raise LayerRefused(f"a whiteout of '{ts.shown(name)}'", m.raw)
        target = _join(parent, name)
        if self.paths.find(target) is not None:  # this layer's own: only its lower part goes
            self._prune(target)
            return
        fd = self.walk(parent, None)
        if fd is None:
            return
        try:
            st = _lstat(fd, name)
            if st is not None:
                self.close()
                _remove(fd, name, st)
        finally:
            os.close(fd)

    def _prune(self, path: bytes) -> None:
        """Remove from the directory ``path`` what this layer did not add."""
        fd = self.walk(path, None)
        if fd is None:
            return
        self.close()
        try:
            self._prune_fd(fd, self.paths.find(path))
        finally:
            os.close(fd)

    def _prune_fd(self, fd: int, node: int | None) -> None:
        for leaf in os.listdir(fd):
            name = os.fsencode(leaf)
            child = None if node is None else self.paths.ids.get((node, name))
            st = _lstat(fd, name)
            if st is None:
                continue
            if child is None:
                _remove(fd, name, st)
            elif stat.S_ISDIR(st.st_mode):
                below = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._prune_fd(below, child)
                finally:
                    os.close(below)

    def finish(self) -> None:
        """Set the modes and times of this layer's directories (after their entries, which
        changed the times), each after those below it (a parent's id is the smaller)."""
        self.close()
        for node in sorted(self.dirs, reverse=True):
            mode, mtime = self.dirs[node]
            fd = self.walk(self.paths.path(node), None)
            if fd is None:
                continue  # replaced or whited out later in the layer
            try:
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)


@contextlib.contextmanager
def _root_fd(root: int | str | os.PathLike[str]) -> Iterator[int]:
    if isinstance(root, int):
        yield root
        return
    fd = os.open(root, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def apply_layer(layer: BinaryIO, media_type: str, root: int | str | os.PathLike[str],
                limits: LayerLimits = DEFAULT_LIMITS) -> LayerInfo:
    """Apply the layer read from ``layer`` (of the OCI ``media_type``) onto the tree at
    ``root`` (a directory descriptor, kept open, or a path), as the module docstring says.
    LayerRefused for a layer stockade does not apply (the tree is then half-applied: throw
    it away), UnpackError when the host cannot write it."""
    source = ts.Source(layer, media_type, limits)
    current: Member | None = None
    try:
        with _root_fd(root) as fd:
            tree = _Layer(fd, limits)
            try:
                for current, data in ts.members(source):
                    tree.add(current, data)
                current = None
                tree.finish()
            finally:
                tree.close()
    except OSError as e:
        where = "" if current is None else f" entry '{ts.shown(current.raw)}'"
        raise UnpackError(f"cannot apply the image layer{where}: {e.strerror or e}") from e
    return LayerInfo(f"sha256:{source.diff.hexdigest()}", f"sha256:{source.raw.sha.hexdigest()}",
                     source.raw.size, source.size, tree.entries, tree.files, tree.bytes,
                     tree.whiteouts, tree.skipped, tree.stripped)


def layer_diff_id(layer: BinaryIO, media_type: str, limits: LayerLimits = DEFAULT_LIMITS
                  ) -> str:
    """The DiffID (sha256 of the uncompressed stream) of the layer read from ``layer``,
    nothing unpacked; inflation bounded as when applying it (LayerRefused otherwise)."""
    source = ts.Source(layer, media_type, limits)
    while source.more():
        pass
    return f"sha256:{source.diff.hexdigest()}"


def unpack_image(layers: Sequence[tuple[Path, str, str]], dest: Path,
                 limits: LayerLimits = DEFAULT_LIMITS) -> list[LayerInfo]:
    """Apply ``layers`` (each a file, its media type and the DiffID the image config gives
    it), lowest first, into a fresh directory next to ``dest``, then publish it as ``dest``
    (a name the caller derives from the content, e.g. the chain ID) with one atomic rename:
    0755, owned by the caller. ``limits`` count over the whole image. On any error the new
    directory is removed and ``dest`` untouched. If ``dest`` appears meanwhile (another
    unpack of the same content won), it is kept and this copy removed."""
    for _, _, expected in layers:
        if not isinstance(expected, str) or not _DIFF_ID.fullmatch(expected):
            raise LayerRefused(f"the DiffID '{ts.shown(str(expected).encode())}' is not "
                               "sha256:<64 lowercase hex digits>")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial",
                                     dir=dest.parent))
    except OSError as e:
        raise UnpackError(f"cannot unpack the image next to {dest}: {e.strerror}") from e
    published = False
    try:
        infos = _apply_all(layers, work, limits)
        try:
            os.rename(work, dest)
            published = True
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise UnpackError(f"cannot publish the image as {dest}: {e.strerror}") from e
        return infos
    finally:
        if not published:
            shutil.rmtree(work, ignore_errors=True)


def _apply_all(layers: Sequence[tuple[Path, str, str]], work: Path,
               limits: LayerLimits) -> list[LayerInfo]:
    infos: list[LayerInfo] = []
    fd = os.open(work, _DIR_FLAGS)
    try:
        for number, (path, media_type, expected) in enumerate(layers, 1):
            try:
                with open(path, "rb") as f:
                    info = apply_layer(f, media_type, fd, limits)
            except OSError as e:
                raise UnpackError(f"cannot read layer {number} ({path}): {e.strerror}") from e
            if info.diff_id != expected:
                raise LayerRefused(f"layer {number}: its DiffID is {info.diff_id}, not the "
                                   f"{expected} of the image config")
            limits = limits._replace(max_bytes=limits.max_bytes - info.tar_size,
                                     max_entries=limits.max_entries - info.entries)
            infos.append(info)
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    return infos
