"""Artifact collection: glob semantics, symlinks refused, caps, hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from stockade.runner.artifacts import Caps, collect
from stockade.runner.globs import glob_match


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
    assert glob_match(pattern, path) is hit


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
    got = collect(ws, ("dist/**",), dest, Caps(max_file=1 << 20, max_total=1 << 20))
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
    got = collect(ws, ("*.bin",), tmp_path / "d", Caps(max_file=500, max_total=250))
    assert [a.path for a in got.stored] == ["a.bin", "b.bin"]
    assert len(got.refused) == 2


def test_glob_matching_cannot_backtrack_without_end() -> None:
    # a backtracking regex takes longer than any test run on this; the matcher is bounded
    pattern = "*a" * 18 + "*b"
    name = "a" * 250
    assert glob_match(pattern, name) is False
    assert glob_match("**/" * 30 + "x", "/".join(["d"] * 200)) is False
    assert glob_match("**/" * 30 + "x", "/".join(["d"] * 200) + "/x") is True


def test_collect_caps_the_number_of_files(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for i in range(50):
        (ws / f"{i:03}.txt").write_bytes(b"")
    got = collect(ws, ("*",), tmp_path / "d", Caps(1 << 20, 1 << 20, max_files=10))
    assert len(got.stored) == 10 and len(list((tmp_path / "d").iterdir())) == 10
    assert len(got.refused) == 40
    assert "artifact_max_files" in got.refused[0]


def test_refusals_kept_are_bounded(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for i in range(300):
        os.symlink("/", ws / f"l{i:03}")
    got = collect(ws, ("*",), tmp_path / "d", Caps(1 << 20, 1 << 20))
    assert len(got.refused) == 101 and got.refused[-1] == "... and 200 more refused"


def test_sparse_files_stay_sparse(tmp_path: Path) -> None:
    ws, dest = tmp_path / "ws", tmp_path / "d"
    ws.mkdir()
    with open(ws / "sparse.img", "wb") as f:
        f.write(b"head")
        f.seek(256 << 20)
        f.write(b"tail")
    got = collect(ws, ("*.img",), dest, Caps(1 << 30, 1 << 30))
    copy = dest / "sparse.img"
    assert copy.stat().st_size == (256 << 20) + 4
    assert copy.stat().st_blocks * 512 < 1 << 20  # the hole was not written out
    digest = hashlib.sha256(b"head" + bytes((256 << 20) - 4) + b"tail").hexdigest()
    assert got.stored[0].sha256 == digest


def test_names_with_controls_or_secrets_are_refused(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a\n12:00:00 ==> step deploy succeeded").write_bytes(b"x")
    (ws / "bidi\u202etxt.exe").write_bytes(b"x")  # shown as "bidiexe.txt"
    (ws / "tab\tname.txt").write_bytes(b"x")
    (ws / "token-s3cr3tvalue.txt").write_bytes(b"x")
    (ws / "ok.txt").write_bytes(b"x")
    got = collect(ws, ("*",), tmp_path / "d", Caps(1 << 20, 1 << 20),
                  secret_names=lambda s: ["TOKEN"] if "s3cr3tvalue" in s else [],
                  show=lambda s: s.replace("s3cr3tvalue", "***").replace("\n", "\\n"))
    assert [a.path for a in got.stored] == ["ok.txt"]
    text = "\n".join(got.refused)
    assert "s3cr3tvalue" not in text and "control or bidi characters" in text
    assert "\n12:00" not in text and len(got.refused) == 4
    assert got.leaks == [("token-***.txt", ["TOKEN"])]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["ok.txt"]


def test_unscannable_files_are_withheld(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.zip").write_bytes(b"x")
    got = collect(ws, ("*",), tmp_path / "d", Caps(1 << 20, 1 << 20),
                  scan=lambda p: (set(), "encrypted zip"))
    assert got.stored == [] and "cannot be scanned" in got.refused[0]
    assert not (tmp_path / "d" / "a.zip").exists()


def test_openat2_never_follows_a_link_in_any_component(tmp_path: Path) -> None:
    from stockade.runner.artifacts import openat2

    ws = tmp_path / "ws"
    (ws / "real").mkdir(parents=True)
    (ws / "real" / "f").write_text("x")
    os.symlink(tmp_path, ws / "swapped")  # a directory swapped for a link to outside
    root = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(openat2(root, "real/f", os.O_RDONLY))
        for path in ("swapped/ws/real/f", "../ws/real/f", "/etc/passwd"):
            with pytest.raises(OSError):
                openat2(root, path, os.O_RDONLY)
    finally:
        os.close(root)


def test_collection_stops_at_the_jobs_deadline(tmp_path: Path) -> None:
    import time

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("x")
    got = collect(ws, ("*",), tmp_path / "d",
                  Caps(1 << 20, 1 << 20, deadline=time.monotonic() - 1))
    assert got.stored == [] and "time ran out" in got.refused[0]


def test_a_huge_directory_is_never_listed_whole(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "many").mkdir(parents=True)
    for i in range(500):
        (ws / "many" / f"f{i}").write_bytes(b"")
    got = collect(ws, ("nothing-matches",), tmp_path / "d", Caps(1 << 20, 1 << 20,
                                                                  max_entries=100))
    assert got.refused == ["many: more than 100 entries in the workspace; the rest is not "
                           "collected"]


def test_hard_links_are_scanned_once(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.bin").write_bytes(b"x")
    for i in range(20):
        os.link(ws / "a.bin", ws / f"link{i}.bin")
    scanned: list[Path] = []

    def scan(path: Path) -> tuple[set[str], str | None]:
        scanned.append(path)
        return {"TOKEN"}, None

    got = collect(ws, ("*",), tmp_path / "d", Caps(1 << 20, 1 << 20), scan=scan)
    assert len(scanned) == 1 and got.stored == [] and len(got.leaks) == 21
