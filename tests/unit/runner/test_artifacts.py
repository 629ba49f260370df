"""Artifact collection: glob semantics, symlinks refused, caps, hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from stockade.runner.artifacts import collect, glob_regex


@pytest.mark.parametrize("pattern, path, hit", [
    ("dist/**", "dist/a.whl", True),
    ("dist/**", "dist/sub/b.txt", True),
    ("dist/**", "distx/a", False),
    ("dist/", "dist/sub/b.txt", True),
    ("dist", "dist/sub/b.txt", True),
    ("*.xml", "report.xml", True),
    ("*.xml", "sub/report.xml", False),
    ("**/*.xml", "sub/deep/report.xml", True),
    ("**/*.xml", "report.xml", True),
    ("reports/?.txt", "reports/a.txt", True),
    ("reports/?.txt", "reports/ab.txt", False),
])
def test_glob(pattern: str, path: str, hit: bool) -> None:
    assert bool(glob_regex(pattern).match(path)) is hit


def test_collect_hashes_and_refuses_links(tmp_path: Path) -> None:
    ws, dest = tmp_path / "ws", tmp_path / "dest"
    (ws / "dist" / "sub").mkdir(parents=True)
    (ws / "dist" / "a.txt").write_bytes(b"hello")
    (ws / "dist" / "sub" / "b.bin").write_bytes(b"\0" * 10)
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    os.symlink(secret, ws / "dist" / "link")
    os.symlink("/", ws / "dist" / "root")
    os.mkfifo(ws / "dist" / "fifo")
    got = collect(ws, ("dist/**",), dest, max_file=1 << 20, max_total=1 << 20)
    assert [(a.path, a.size) for a in got.stored] == [("dist/a.txt", 5), ("dist/sub/b.bin", 10)]
    assert got.stored[0].sha256 == hashlib.sha256(b"hello").hexdigest()
    assert sorted(r.split(":")[0] for r in got.refused) == ["dist/link", "dist/root"]
    assert (dest / "dist" / "a.txt").read_bytes() == b"hello"
    assert not (dest / "dist" / "link").exists()


def test_collect_caps(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in "abc":
        (ws / f"{name}.bin").write_bytes(b"x" * 100)
    (ws / "big.bin").write_bytes(b"x" * 1000)
    got = collect(ws, ("*.bin",), tmp_path / "d", max_file=500, max_total=250)
    assert [a.path for a in got.stored] == ["a.bin", "b.bin"]
    assert len(got.refused) == 2
