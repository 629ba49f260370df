"""The head of the audit chain, anchored twice, so that a removed tail is detected.

The chain alone proves that no event was altered, reordered or removed *between* other events;
removing the newest events leaves a shorter chain that verifies. So the store keeps the head
(the number of events and the last hash) in a record it updates in the same transaction as
every appended event, and copies it to a :class:`HeadFile` outside the database after each
commit. :func:`check_head` compares the trail with both: rows removed, rows and the head record
removed together, or the database replaced by an older copy, each leave a head that the trail
does not reach. The file may lag behind the database by the events of a commit whose process
died before writing it, so the file need only name an event of the chain.
"""

import fcntl
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from stockade.audit.events import GENESIS, AuditEvent

_RECORD = 128  # bytes: one JSON line padded with spaces, so that every write has one size
_MAX_FILE = 4096  # anything longer is not ours
_HEX = frozenset("0123456789abcdef")


class AuditHead(NamedTuple):
    """``events`` events, the newest with chain hash ``hash`` (GENESIS when there are none)."""

    events: int
    hash: str


class AuditSnapshot(NamedTuple):
    """The trail with its two heads, as ``audit verify`` checks them."""

    records: list[tuple[AuditEvent, str, str]]  # (event, prev_hash, hash), oldest first
    db_head: AuditHead | None  # the head record in the database (None if it is gone)
    file_head: AuditHead | None  # the copy outside the database (None if missing or unreadable)
    file_problem: str  # why the copy could not be read ("" if it could, or is just missing)


def head_of(hashes: Sequence[str]) -> AuditHead:
    """The head of a trail given its chain hashes in order."""
    return AuditHead(len(hashes), hashes[-1] if hashes else GENESIS)


class HeadFile:
    """The copy of the head outside the database: one fixed-size JSON line, read and written
    in place under ``flock`` (held for one read or write), so that a reader never sees half a
    write and a killed writer leaves the old head or the new one. In place rather than by
    rename: replacing a file makes ext4 flush its data, ~1 ms for every audited transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> AuditHead | None:
        """The head in the file; None if there is none, ValueError if it is not one of ours."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._parse(os.pread(fd, _MAX_FILE + 1, 0))
        finally:
            os.close(fd)

    def retire(self) -> Path | None:
        """A new database starts a new trail: keep the earlier trail's head as
        ``audit.head.before-<time>`` (evidence that ``audit verify`` reports), if there is one."""
        try:
            earlier = self.read()
        except ValueError:
            earlier = None  # not a head: kept all the same, verify says so
        else:
            if earlier is None:
                return None
            if earlier.events == 0:  # a first run killed before its commit: nothing to keep
                self.path.unlink()
                return None
        kept = self.path.with_name(f"{self.path.name}.before-{time.time_ns() // 1_000_000}")
        os.rename(self.path, kept)
        return kept

    def retired(self) -> list[Path]:
        """The heads of earlier trails (oldest first)."""
        return sorted(self.path.parent.glob(f"{self.path.name}.before-*"))

    def create(self, head: AuditHead) -> None:
        """Write ``head`` unless the file exists: an existing file is never reset, it may be
        the evidence of a removed tail."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._write(fd, head)
        finally:
            os.close(fd)

    def advance(self, before: AuditHead, after: AuditHead,
                on_chain: Callable[[AuditHead], bool]) -> None:
        """After a commit moved the head from ``before`` to ``after``, move the file along.

        The file moves only forward along the chain it names: if it is missing, not ours,
        ahead of ``before`` or on another chain (``on_chain`` says whether the trail holds a
        head), it stays as it is, because it is what ``audit verify`` reports. A file left
        behind (its writer died after the commit, or another commit came in between) names an
        event of the chain, and moves on."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = self._parse(os.pread(fd, _MAX_FILE + 1, 0))
            except ValueError:
                return
            if current == before or (current.events < before.events and on_chain(current)):
                self._write(fd, after)
        finally:
            os.close(fd)

    def _parse(self, raw: bytes) -> AuditHead:
        try:
            doc = json.loads(raw[:_MAX_FILE].decode())
            head = AuditHead(doc["count"], doc["hash"])
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise ValueError(f"{self.path} is not an audit head file") from e
        if len(raw) > _MAX_FILE or type(head.events) is not int or head.events < 0 \
                or not _is_hash(head.hash):
            raise ValueError(f"{self.path} is not an audit head file")
        return head

    @staticmethod
    def _write(fd: int, head: AuditHead) -> None:
        record = f'{{"count": {int(head.events)}, "hash": {json.dumps(head.hash)}}}'
        os.pwrite(fd, (record.ljust(_RECORD - 1) + "\n").encode(), 0)
        if os.fstat(fd).st_size != _RECORD:
            os.ftruncate(fd, _RECORD)


def check_head(hashes: Sequence[str], db_head: AuditHead | None, file_head: AuditHead | None,
               file_problem: str, file_name: str) -> list[str]:
    """What the trail (its chain hashes, in order) and its two heads disagree on, for a person.

    ``db_head`` is the database's head record (None if it is gone); ``file_head`` the copy in
    ``file_name`` (None if missing, with ``file_problem`` saying why when it was unreadable).
    """
    found = head_of(hashes)
    problems = []
    if db_head is None:
        problems.append(f"the database's head record is missing (found {_describe(found)})")
    elif db_head != found:
        problems.append(f"the database's head record expects {_describe(db_head)}, found "
                        f"{_describe(found)}: {_cause(db_head, found)}")
    if file_head is None:
        problems.append(file_problem or f"{file_name} (the copy of the head outside the "
                        f"database) is missing (found {_describe(found)})")
    elif file_head.events > found.events:
        problems.append(f"{file_name} expects at least {_describe(file_head)}, found "
                        f"{_describe(found)}: the newest events were removed, or the database "
                        "was replaced by an older copy")
    elif (reached := head_of(hashes[:file_head.events])) != file_head:
        problems.append(f"{file_name} expects event {file_head.events} to have hash "
                        f"{file_head.hash}, found {reached.hash}: the database was replaced "
                        "or rewritten")
    return problems


def _describe(head: AuditHead) -> str:
    return f"{head.events} events, last hash {head.hash}"


def _cause(expected: AuditHead, found: AuditHead) -> str:
    if found.events < expected.events:
        return "the newest events were removed"
    return "events were added or changed without the head"


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX
