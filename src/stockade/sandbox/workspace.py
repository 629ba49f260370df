"""Copying the user's workspace into the job's tmpfs: what is not excluded, and nothing but
regular files, directories and links.

Excludes use gitignore syntax (``pathspec``'s gitignore matcher): the lines of
:data:`IGNORE_FILE` at the workspace's root, then the ``--exclude`` patterns of ``stockade run``
(carried by :class:`~stockade.sandbox.interface.WorkspaceSource`). Both come from whoever
submits the job and can only leave paths of the workspace out of the copy. An excluded
directory is never walked, so nothing inside it can be re-included (as in git).

Hostile input stays bounded: the ignore file is read only if it is a regular file, up to
:data:`MAX_IGNORE_BYTES`, with at most :data:`MAX_PATTERNS` patterns; a pattern may hold one
``**`` (a pattern without a ``/`` starts with an implicit one) and two other ``*`` at most, so
that no single match backtracks for long; matching as a whole may take
:data:`MATCH_ALLOWANCE_S` plus :data:`MATCH_PER_PATH_S` per path; the tree may nest
:data:`MAX_DEPTH` directories. The runner (root) reads the tree through directory file
descriptors and never follows a link (a file swapped for a link or a FIFO during the copy is
left out), and writes into the fresh tmpfs the same way.

:func:`measure_workspace` walks the tree once without copying, so that ``stockade run`` refuses
a workspace that would not fit before the job is submitted.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from stockade.errors import SandboxError, UsageError
from stockade.sandbox.interface import WorkspaceCopy, WorkspaceSource
from stockade.spec.units import format_size
from stockade.text import escape_controls

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

IGNORE_FILE = ".stockadeignore"
MAX_IGNORE_BYTES = 64 * 1024
MAX_PATTERNS = 1000
MAX_STARS = 2  # '*' wildcards per pattern, besides one '**'
MATCH_ALLOWANCE_S = 10.0
MATCH_PER_PATH_S = 0.001
MAX_DEPTH = 200  # two descriptors per level are open while copying
MAX_PATH = 4096
# files, links and directories: each costs the kernel ~1 KiB (inode, dentry) whatever its size,
# outside the job's memory limit while the runner copies
MAX_ENTRIES = 100_000
ENTRY_COST = 1024
EXAMPLES = 5
PAGE = 4096  # tmpfs allocates file data (and links longer than SHORT_LINK) by page
SHORT_LINK = 127
EXCLUDE_HINT = f"exclude files with {IGNORE_FILE} at the workspace root or --exclude PATTERN"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR, _END, _FILE, _LINK = "dir", "end", "file", "link"


class WorkspaceSize(NamedTuple):
    """What a copy of a workspace would hold, and the room it would take in the tmpfs."""

    copy: WorkspaceCopy
    space: int  # bytes of tmpfs: file data in whole pages
    largest: tuple[tuple[str, int], ...]  # the biggest top-level entries and their bytes


class Excludes:
    """The compiled patterns, with what they left out and the time matching took."""

    def __init__(self, spec: GitIgnoreSpec | None) -> None:
        self._spec = spec
        self.count = 0
        self.paths: list[str] = []
        self._matched = 0
        self._spent = 0.0

    def excluded(self, rel: str) -> bool:
        """Whether ``rel`` (a directory ends with ``/``) is left out."""
        if self._spec is None:
            return False
        started = time.monotonic()
        hit = self._spec.match_file(rel)
        self._spent += time.monotonic() - started
        self._matched += 1
        if self._spent > MATCH_ALLOWANCE_S + MATCH_PER_PATH_S * self._matched:
            raise UsageError(f"the exclude patterns took over {self._spent:.0f}s to match "
                             f"{self._matched} paths of the workspace",
                             hint=f"use fewer or simpler patterns in {IGNORE_FILE}/--exclude")
        if hit:
            self.count += 1
            if len(self.paths) < EXAMPLES:
                self.paths.append(rel)
        return bool(hit)


def load_excludes(root_fd: int, extra: Sequence[str]) -> Excludes:
    """The patterns of the ignore file at ``root_fd`` followed by ``extra``; UsageError if one
    is invalid, too complex or too many."""
    lines = [(f"{IGNORE_FILE} line {n}:", line)
             for n, line in enumerate(_read_ignore_file(root_fd), 1)]
    lines += [("--exclude", p) for p in extra]
    patterns = [(where, line) for where, line in lines
                if line.strip() and not line.startswith("#")]
    if len(patterns) > MAX_PATTERNS:
        raise UsageError(f"{len(patterns)} exclude patterns; at most {MAX_PATTERNS} are allowed",
                         hint=f"shorten {IGNORE_FILE} (e.g. exclude whole directories)")
    if not patterns:
        return Excludes(None)
    from pathspec import GitIgnoreSpec  # ~60 ms to import: only for a workspace with excludes

    for where, line in patterns:
        _check_pattern(where, line, GitIgnoreSpec)
    return Excludes(GitIgnoreSpec.from_lines([line for _, line in patterns]))


def _read_ignore_file(root_fd: int) -> list[str]:
    try:
        fd = os.open(IGNORE_FILE, _READ_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return []
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
        raise UsageError(f"{IGNORE_FILE} {why}",
                         hint=f"make {IGNORE_FILE} a readable regular file") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{IGNORE_FILE} is not a regular file",
                             hint=f"make {IGNORE_FILE} a regular file of patterns")
        data = b""
        while len(data) <= MAX_IGNORE_BYTES and (chunk := os.read(fd, MAX_IGNORE_BYTES + 1)):
            data += chunk
    except OSError as e:
        raise UsageError(f"{IGNORE_FILE} cannot be read ({e.strerror})",
                         hint=f"make {IGNORE_FILE} a readable regular file") from e
    finally:
        os.close(fd)
    if len(data) > MAX_IGNORE_BYTES:
        raise UsageError(f"{IGNORE_FILE} is larger than {MAX_IGNORE_BYTES // 1024} KiB",
                         hint="exclude whole directories rather than many single files")
    # names are decoded the same way (os.listdir): undecodable bytes still match
    text = data.decode("utf-8", "surrogateescape")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _check_pattern(where: str, line: str, spec: type[GitIgnoreSpec]) -> None:
    body = re.sub(r"\\.", "x", line.strip().removeprefix("!")).rstrip("/")
    parts = body.split("/")
    inner = [p for i, p in enumerate(parts) if p == "**" and 0 < i < len(parts) - 1]
    doubles = len(inner) + (parts[0] == "**" or len(parts) == 1)
    stars = sum(len(re.findall(r"\*+", p)) for p in parts if p != "**")
    if doubles > 1 or stars > MAX_STARS:
        raise UsageError(f"{where} '{_excerpt(line)}' is too complex to match quickly",
                         hint=f"a pattern may hold one ** (a pattern without '/' starts with "
                         f"an implicit **/) and {MAX_STARS} other * at most")
    try:
        spec.from_lines([line])
    except (ValueError, re.error) as e:  # pathspec's pattern error is a ValueError
        raise UsageError(f"{where} '{_excerpt(line)}' is not a valid gitignore pattern",
                         hint="a pattern cannot end with a lone backslash, be a bare '!' or "
                         "hold a reversed [range]; see gitignore(5)") from e


class _Entry(NamedTuple):
    kind: str
    rel: str
    parent_fd: int  # the directory of ``name`` (the source tree)
    name: str
    st: os.stat_result


class _Dir(NamedTuple):
    fd: int
    rel: str  # "" for the root, else ending with "/"
    names: Iterator[str]
    entry: _Entry | None  # None for the root


def _walk(root_fd: int, rules: Excludes) -> Iterator[_Entry]:
    """Depth first: a directory, its entries, then its ``_END``; excluded paths, their
    contents and special files are skipped. Nothing is followed; ``_Entry.parent_fd`` is
    valid until the directory's ``_END``."""
    stack = [_Dir(root_fd, "", iter(_names(root_fd, "")), None)]
    entries = 0
    try:
        while stack:
            top = stack[-1]
            name = next(top.names, None)
            if name is None:
                stack.pop()
                if top.entry is not None:
                    os.close(top.fd)
                    yield top.entry._replace(kind=_END)
                continue
            rel = top.rel + name
            try:
                st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
            except FileNotFoundError:  # removed while the workspace is read: left out
                continue
            kind = _kind(st.st_mode)
            if kind is None or rules.excluded(rel + "/" if kind == _DIR else rel):
                continue
            entries += 1
            if entries > MAX_ENTRIES:
                raise _too_many()
            entry = _Entry(kind, rel, top.fd, name, st)
            if kind == _DIR:
                _check_shape(rel, len(stack))
                fd = os.open(name, _DIR_FLAGS, dir_fd=top.fd)
                stack.append(_Dir(fd, rel + "/", iter(_names(fd, rel)), entry))
            yield entry
    finally:
        for left in stack[1:]:
            os.close(left.fd)


def _names(fd: int, rel: str) -> list[str]:
    """The names in a directory, sorted; a directory too big to copy is refused unread."""
    names = []
    with os.scandir(fd) as it:
        for e in it:
            names.append(e.name)
            if len(names) > MAX_ENTRIES:
                raise _too_many()
    return sorted(names)


def _too_many() -> UsageError:
    return UsageError(f"the workspace holds more than {MAX_ENTRIES} files, links and "
                      "directories", hint=EXCLUDE_HINT)


def _kind(mode: int) -> str | None:
    """Sockets, FIFOs and device nodes are not copied: opening a FIFO would hang the copy."""
    if stat.S_ISREG(mode):
        return _FILE
    if stat.S_ISDIR(mode):
        return _DIR
    return _LINK if stat.S_ISLNK(mode) else None


def _check_shape(rel: str, depth: int) -> None:
    if depth > MAX_DEPTH or len(rel.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise UsageError(f"the workspace nests too deep at {_excerpt(rel)} (at most "
                         f"{MAX_DEPTH} directories and {MAX_PATH} bytes of path)",
                         hint=EXCLUDE_HINT)


def _open_root(src: WorkspaceSource) -> tuple[int, Excludes]:
    """The workspace's directory (the user named it: a link to it is fine) and its excludes."""
    fd = os.open(src.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return fd, load_excludes(fd, src.excludes)
    except BaseException:
        os.close(fd)
        raise


def measure_workspace(src: WorkspaceSource) -> WorkspaceSize:
    """What copying ``src`` would copy, in one walk that reads no file."""
    try:
        root, rules = _open_root(src)
    except OSError as e:
        raise UsageError(f"cannot read the workspace {_excerpt(str(src.path))}: {e.strerror}",
                         hint="pass --workspace DIR with a readable directory") from e
    files = nbytes = space = 0
    top: dict[str, int] = {}
    try:
        for entry in _walk(root, rules):
            if entry.kind != _END:
                space += ENTRY_COST
            if entry.kind in (_FILE, _LINK):
                files += 1
                nbytes += entry.st.st_size
                space += _pages(entry)
                head = entry.rel.split("/", 1)
                key = head[0] + ("/" if len(head) > 1 else "")
                top[key] = top.get(key, 0) + entry.st.st_size
    except OSError as e:
        where = f" ({_excerpt(os.fsdecode(e.filename))})" if e.filename else ""
        raise UsageError(f"cannot read the workspace {_excerpt(str(src.path))}: "
                         f"{e.strerror}{where}", hint=EXCLUDE_HINT) from e
    finally:
        os.close(root)
    largest = tuple(sorted(top.items(), key=lambda kv: -kv[1])[:3])
    return WorkspaceSize(WorkspaceCopy(files, nbytes, rules.count, tuple(rules.paths)),
                         space, largest)


def _pages(e: _Entry) -> int:
    if e.kind == _LINK:
        return PAGE if e.st.st_size > SHORT_LINK else 0
    return -(-e.st.st_size // PAGE) * PAGE


def check_workspace(src: WorkspaceSource, limit: int, ceiling: int) -> WorkspaceSize:
    """Measure ``src``; UsageError, with human sizes and what to change, if it would not fit
    into the job's workspace of ``limit`` bytes (the operator allows ``ceiling``)."""
    size = measure_workspace(src)
    if size.space <= limit:
        return size
    c = size.copy
    paged = (f" ({format_size(size.space)} in the sandbox: {PAGE // 1024} KiB pages, "
             f"{ENTRY_COST // 1024} KiB an entry)" if size.space > c.bytes * 1.1 else "")
    largest = ", ".join(f"{_excerpt(name)} {format_size(n)}" for name, n in size.largest)
    excluded = f", {_count(c.excluded, 'path')} excluded" if c.excluded else ""
    raise_to = (f"raise resources.workspace in the job spec (this runner allows at most "
                f"{format_size(ceiling)}), or " if limit < ceiling else "")
    raise UsageError(
        f"workspace {_excerpt(str(src.path))} is {format_size(c.bytes)}{paged} in "
        f"{_count(c.files, 'file')}"
        f"{excluded}; the job allows {format_size(limit)} (resources.workspace)\n"
        f"largest: {largest}",
        hint=raise_to + EXCLUDE_HINT + " (gitignore syntax)")


def copy_workspace(src: WorkspaceSource, dst: Path, uid: int, gid: int, limit: int
                   ) -> WorkspaceCopy:
    """Copy ``src`` (minus its excludes) into the existing directory ``dst``, everything
    owned by ``uid``:``gid``; return what was copied."""
    if not src.path.is_dir():
        raise UsageError(f"workspace {src.path} is not a directory",
                         hint="pass --workspace DIR")
    try:
        root, rules = _open_root(src)
    except OSError as e:
        raise SandboxError(f"cannot open the workspace {src.path}: {e.strerror}") from e
    try:
        dst_fd = os.open(dst, _DIR_FLAGS)
        try:
            files, nbytes = _copy_tree(root, dst_fd, rules, uid, gid)
        finally:
            os.close(dst_fd)
    except OSError as e:
        _raise_copy_error(src.path, e, limit)
    finally:
        os.close(root)
    return WorkspaceCopy(files, nbytes, rules.count, tuple(rules.paths))


def _copy_tree(root: int, dst: int, rules: Excludes, uid: int, gid: int) -> tuple[int, int]:
    files = nbytes = 0
    dirs = [dst]  # the copy of each directory _walk is in
    try:
        for e in _walk(root, rules):
            if e.kind == _DIR:
                os.mkdir(e.name, 0o700, dir_fd=dirs[-1])
                dirs.append(os.open(e.name, _DIR_FLAGS, dir_fd=dirs[-1]))
                os.fchown(dirs[-1], uid, gid)
            elif e.kind == _END:
                fd = dirs.pop()
                _finish(fd, e.st)
                os.close(fd)
            elif e.kind == _LINK:
                os.symlink(os.readlink(e.name, dir_fd=e.parent_fd), e.name, dir_fd=dirs[-1])
                os.chown(e.name, uid, gid, dir_fd=dirs[-1], follow_symlinks=False)
                files, nbytes = files + 1, nbytes + e.st.st_size
            else:
                copied = _copy_file(e, dirs[-1], uid, gid)
                if copied is not None:
                    files, nbytes = files + 1, nbytes + copied
    finally:
        for fd in dirs[1:]:
            os.close(fd)
    return files, nbytes


def _copy_file(e: _Entry, dst: int, uid: int, gid: int) -> int | None:
    """Copy one regular file (None: it is no longer one); its mode without setuid, setgid and
    sticky bits, and its times (build tools compare them)."""
    try:
        src = os.open(e.name, _READ_FLAGS, dir_fd=e.parent_fd)
    except OSError as err:  # swapped for a link, or removed, while the workspace is read
        if err.errno in (errno.ELOOP, errno.ENOENT):
            return None
        raise
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            return None
        out = os.open(e.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=dst)
        try:
            copied = _send(src, out)
            os.fchown(out, uid, gid)
            _finish(out, st)
        finally:
            os.close(out)
    finally:
        os.close(src)
    return copied


def _finish(fd: int, st: os.stat_result) -> None:
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o777)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _send(src: int, out: int) -> int:
    """Copy to the end of ``src`` (in the kernel where it can)."""
    total = 0
    try:
        while n := os.sendfile(out, src, None, 1 << 30):
            total += n
        return total
    except OSError as e:
        if total or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while chunk := os.read(src, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
        total += len(chunk)
    return total


def _raise_copy_error(src: Path, e: OSError, limit: int) -> NoReturn:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise UsageError(
            f"workspace {_excerpt(str(src))} does not fit into the job's workspace limit "
            f"({format_size(limit)})",
            hint=f"raise resources.workspace in the job spec or {EXCLUDE_HINT}") from e
    where = f" ({_excerpt(os.fsdecode(e.filename))})" if e.filename else ""
    raise SandboxError(f"cannot copy the workspace {_excerpt(str(src))}: {e.strerror}{where}") \
        from e


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _excerpt(text: str, limit: int = 120) -> str:
    """A job-chosen name, short and with no control character (for a message)."""
    short = text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
    return escape_controls(short)
