"""Debian package versions in dpkg's order: ``[epoch:]upstream[-revision]``, epochs compared
as numbers, then upstream and revision by dpkg's ``verrevcmp``: alternating runs of
non-digits, compared character by character (``~`` before anything, even the end of the run;
letters before other symbols), and digits, compared as numbers. A missing revision is ``0``.

An exact port of dpkg's comparison (tested against ``dpkg --compare-versions``), about twelve
times faster than python-debian's (5 against 60 µs a comparison here, most of a scan's
matching time with python-debian): each version is turned once into a key of
``(characters' ranks + end, number)`` runs, and two keys are compared run by run, the shorter
padded with empty runs. Versions come from images and advisories: each is bounded in length
and checked against Debian's syntax before it is used.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import NamedTuple

MAX_VERSION = 256
_EPOCH = re.compile(r"[0-9]{1,9}")
_UPSTREAM = re.compile(r"[A-Za-z0-9.+~:-]+")
_REVISION = re.compile(r"[A-Za-z0-9.+~]+")
_RUNS = re.compile(r"([^0-9]*)([0-9]*)")
_END = 0  # the rank of the end of a run of non-digits (or of a digit after it)
_EMPTY = ((_END,), 0)

Run = tuple[tuple[int, ...], int]


class VersionKey(NamedTuple):
    """A parsed version: compare two with :func:`compare_keys`."""

    epoch: int
    upstream: tuple[Run, ...]
    revision: tuple[Run, ...]


def valid_version(text: str) -> bool:
    """Whether ``text`` is a Debian version stockade compares."""
    try:
        version_key(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=65536)
def version_key(text: str) -> VersionKey:
    """``text`` parsed as dpkg parses it (ValueError if it is not a Debian version): the
    epoch before the first colon, the revision after the last hyphen (not empty if there is
    one); a colon in the upstream version needs an epoch."""
    if not 0 < len(text) <= MAX_VERSION:
        raise ValueError("not a Debian version")
    epoch, _, rest = text.partition(":") if ":" in text else ("0", "", text)
    upstream, hyphen, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    if not _EPOCH.fullmatch(epoch) or not _UPSTREAM.fullmatch(upstream) \
            or (hyphen and not _REVISION.fullmatch(revision)):
        raise ValueError("not a Debian version")
    return VersionKey(int(epoch), _runs(upstream), _runs(revision))


def compare(a: str, b: str) -> int:
    """Negative, zero or positive as ``a`` sorts before, with or after ``b`` in dpkg's order
    (ValueError if either is not a version)."""
    return compare_keys(version_key(a), version_key(b))


def compare_keys(a: VersionKey, b: VersionKey) -> int:
    """:func:`compare` of parsed versions."""
    if a.epoch != b.epoch:
        return -1 if a.epoch < b.epoch else 1
    return _compare_runs(a.upstream, b.upstream) or _compare_runs(a.revision, b.revision)


def _runs(part: str) -> tuple[Run, ...]:
    return tuple(((*(_rank(c) for c in letters), _END), int(digits or 0))
                 for letters, digits in _RUNS.findall(part) if letters or digits)


def _rank(c: str) -> int:
    """dpkg's ``order()`` of a non-digit character."""
    if c == "~":
        return -1
    return ord(c) if c.isalpha() else ord(c) + 256


def _compare_runs(a: tuple[Run, ...], b: tuple[Run, ...]) -> int:
    for x, y in itertools.zip_longest(a, b, fillvalue=_EMPTY):
        if x != y:
            return -1 if x < y else 1
    return 0
