"""Collecting artifacts from a finished job's workspace: globs, no symlinks, size caps, sha256."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stockade.api.protocol import ArtifactReport


@dataclass(frozen=True)
class Collected:
    """What was stored, what was refused (with the reason), and which files leaked secrets."""

    stored: list[ArtifactReport]
    refused: list[str]
    leaks: list[tuple[str, list[str]]] = field(default_factory=list)  # (path, secret names)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """``dist/**`` style globs: ``*``/``?`` stay within a path segment, ``**`` spans segments.

    A pattern ending in ``/`` or naming a directory selects everything below it.
    """
    pattern = pattern.strip("/") if pattern.endswith("/") else pattern
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}(?:/.*)?$", re.DOTALL)


def collect(workspace: Path, patterns: tuple[str, ...], dest: Path,
            max_file: int, max_total: int,
            scan: Callable[[Path], set[str]] | None = None) -> Collected:
    """Copy the regular files of ``workspace`` matching ``patterns`` into ``dest``; a file in
    which ``scan`` finds secrets is withheld and reported as a leak."""
    if not patterns:
        return Collected([], [])
    regexes = [glob_regex(p) for p in patterns]
    stored: list[ArtifactReport] = []
    refused: list[str] = []
    leaks: list[tuple[str, list[str]]] = []
    total = 0
    for rel, entry in _walk(workspace, refused):
        if not any(r.match(rel) for r in regexes):
            continue
        if entry.is_symlink():
            refused.append(f"{rel}: is a symlink; artifacts never follow links")
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        size = entry.stat(follow_symlinks=False).st_size
        if size > max_file or total + size > max_total:
            refused.append(f"{rel}: {size} bytes exceeds the artifact size cap")
            continue
        try:
            rel.encode()
        except UnicodeEncodeError:
            refused.append(f"{rel!r}: the file name is not valid UTF-8")
            continue
        # scanned before it is copied (a second read): a leaking file never reaches the store
        found = scan(Path(entry.path)) if scan else set()
        if found:
            leaks.append((rel, sorted(found)))
            refused.append(f"{rel}: withheld, it contains the secret(s) {', '.join(sorted(found))}")
            continue
        stored.append(_copy(Path(entry.path), dest / rel, rel))
        total += size
    return Collected(stored, refused, leaks)


def _walk(root: Path, refused: list[str]) -> list[tuple[str, os.DirEntry[str]]]:
    """Every entry below ``root`` without following links, iteratively (no recursion limit)."""
    found: list[tuple[str, os.DirEntry[str]]] = []
    stack = [("", str(root))]
    while stack:
        rel_dir, path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            shown = rel_dir if len(rel_dir) < 200 else f"{rel_dir[:100]}…{rel_dir[-60:]}"
            refused.append(f"{shown or '.'}: cannot be read ({e.strerror})")
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append((rel, entry.path))
            else:
                found.append((rel, entry))
    return sorted(found, key=lambda item: item[0])


def _copy(src: Path, dst: Path, rel: str) -> ArtifactReport:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    size = 0
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1024 * 1024):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    os.chmod(dst, 0o600)
    return ArtifactReport(rel, digest.hexdigest(), size)
