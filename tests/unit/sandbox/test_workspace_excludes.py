"""Workspace excludes and the size check, without a sandbox: gitignore semantics, pruning,
and every bound on what the submitter controls (the ignore file, the patterns, the tree)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stockade.errors import UsageError
from stockade.sandbox import workspace
from stockade.sandbox.interface import WorkspaceSource
from stockade.sandbox.workspace import check_workspace, measure_workspace


def tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def kept(root: Path, *excludes: str) -> set[str]:
    """The files a copy of ``root`` would hold, found by walking like the copy does."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rules = workspace.load_excludes(fd, excludes)
        return {e.rel for e in workspace._walk(fd, rules) if e.kind == "file"}
    finally:
        os.close(fd)


def test_gitignore_semantics_of_the_ignore_file_and_the_command_line(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        ".stockadeignore": "# caches\n.venv/\n*.pyc\n!keep.pyc\n/top.log\nbuild\n\n",
        "src/a.py": "", "src/a.pyc": "", "src/keep.pyc": "", ".venv/bin/python": "",
        "top.log": "", "src/top.log": "", "build/x": "", "src/build/y": "", "docs/d.md": "",
        "data/raw.csv": "",
    })
    assert kept(root, "docs/", "data/**") == {
        ".stockadeignore", "src/a.py", "src/keep.pyc", "src/top.log"}


def test_a_file_under_an_excluded_directory_cannot_be_re_included(tmp_path: Path) -> None:
    root = tree(tmp_path, {"out/keep.txt": "", "out/drop.txt": "", "a.txt": ""})
    assert kept(root, "out/", "!out/keep.txt") == {"a.txt"}  # as in git: out/ is not walked


def test_an_excluded_directory_is_counted_once_and_never_walked(tmp_path: Path) -> None:
    deep = tmp_path / ".venv"
    for _ in range(workspace.MAX_DEPTH + 5):  # walking it would be refused as too deep
        deep = deep / "d"
    deep.mkdir(parents=True)
    tree(tmp_path, {".venv/big": b"x" * 100_000, "src/a.py": "print()\n"})
    size = measure_workspace(WorkspaceSource(tmp_path, (".venv",)))
    assert (size.copy.files, size.copy.bytes) == (1, 8)
    assert (size.copy.excluded, size.copy.excluded_paths) == (1, (".venv/",))
    with pytest.raises(UsageError, match="nests too deep"):
        measure_workspace(WorkspaceSource(tmp_path))


def test_size_counts_tmpfs_pages_and_names_the_largest_entries(tmp_path: Path) -> None:
    tree(tmp_path, {f"small/{i}": "x" for i in range(300)})
    tree(tmp_path, {"blob.bin": b"\0" * (600 << 10)})
    size = measure_workspace(WorkspaceSource(tmp_path))
    assert size.copy.bytes == 300 + (600 << 10)
    assert size.space == 300 * 4096 + (600 << 10) + 302 * 1024  # and 1 KiB an entry (dir too)
    assert size.largest[0] == ("blob.bin", 600 << 10)
    with pytest.raises(UsageError) as e:  # 600 KiB of data, but 2.1 MiB of tmpfs
        check_workspace(WorkspaceSource(tmp_path), limit=1 << 20, ceiling=8 << 30)
    text = e.value.diagnostics()
    assert "is 600.3 KiB (2.1 MiB in the sandbox: 4 KiB pages, 1 KiB an entry) in 301 files" in text
    assert "the job allows 1.0 MiB (resources.workspace)" in text
    assert "largest: blob.bin 600.0 KiB, small/ 300 B" in text
    assert "raise resources.workspace in the job spec (this runner allows at most 8.0 GiB)" in text
    assert ".stockadeignore" in text and "--exclude" in text
    size = check_workspace(WorkspaceSource(tmp_path), limit=3 << 20, ceiling=8 << 30)
    assert size.copy.files == 301


def test_at_the_ceiling_the_hint_only_offers_excludes(tmp_path: Path) -> None:
    tree(tmp_path, {"blob.bin": b"\0" * (2 << 20)})
    with pytest.raises(UsageError) as e:
        check_workspace(WorkspaceSource(tmp_path), limit=1 << 20, ceiling=1 << 20)
    assert "raise resources.workspace" not in e.value.diagnostics()
    assert check_workspace(WorkspaceSource(tmp_path, ("*.bin",)), 1 << 20, 1 << 20).space == 0


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.symlink_to("/etc/shadow"), ".stockadeignore is a symbolic link"),
    (lambda p: p.mkdir(), ".stockadeignore is not a regular file"),
    (lambda p: os.mkfifo(p), ".stockadeignore is not a regular file"),  # never blocks
    (lambda p: p.write_text("x\n" * 40_000), ".stockadeignore is larger than 64 KiB"),
    (lambda p: p.write_text("".join(f"p{i}\n" for i in range(1001))), "1001 exclude patterns"),
    (lambda p: p.write_text("ok\nfoo\\\n"), ".stockadeignore line 2: 'foo\\' is not a valid"),
    (lambda p: p.write_text("[z-a]\n"), "line 1: '[z-a]' is not a valid gitignore pattern"),
    (lambda p: p.write_text("*a*a*a*a*a*a*a*b\n"), "line 1: '*a*a*a*a*a*a*a*b' is too complex"),
    (lambda p: p.write_text("**/a/**/b/**/c\n"), "is too complex to match quickly"),
])
def test_a_bad_ignore_file_is_a_clear_usage_error(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / ".stockadeignore")
    started = time.monotonic()
    with pytest.raises(UsageError) as e:
        measure_workspace(WorkspaceSource(tmp_path))
    assert message in e.value.diagnostics()
    assert "root:" not in e.value.diagnostics()  # the link's target is never read
    assert time.monotonic() - started < 2


def test_bad_command_line_patterns_are_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--exclude '\*x\*y\*z' is too complex"):
        measure_workspace(WorkspaceSource(tmp_path, ("*x*y*z",)))
    with pytest.raises(UsageError, match=r"--exclude '!' is not a valid gitignore pattern"):
        measure_workspace(WorkspaceSource(tmp_path, ("!",)))


@pytest.mark.parametrize("pattern", [
    "*a*b", "**/a*a*b", "a/**/*a*b", "**/a/b", "a/**/b", "**/node_modules/**", "*.py[co]"])
def test_allowed_patterns_match_a_hostile_path_quickly(tmp_path: Path, pattern: str) -> None:
    from pathspec import GitIgnoreSpec

    workspace._check_pattern("--exclude", pattern, GitIgnoreSpec)  # accepted
    spec = GitIgnoreSpec.from_lines([pattern])
    for segment in (1, 3, 16, 255):
        path = "/".join(["a" * segment] * (workspace.MAX_PATH // (segment + 1))) + "/c"
        started = time.monotonic()
        spec.match_file(path)
        assert time.monotonic() - started < 0.05, (pattern, segment)


def test_matching_time_is_bounded_over_the_whole_walk(tmp_path: Path, monkeypatch) -> None:
    tree(tmp_path, {f"f{i}": "" for i in range(50)})
    monkeypatch.setattr(workspace, "MATCH_ALLOWANCE_S", 0.0)
    monkeypatch.setattr(workspace, "MATCH_PER_PATH_S", 0.0)
    with pytest.raises(UsageError, match="the exclude patterns took over 0s to match"):
        measure_workspace(WorkspaceSource(tmp_path, ("*.tmp",)))
    # no patterns: nothing is matched
    assert measure_workspace(WorkspaceSource(tmp_path)).copy.files == 50


def test_special_files_are_skipped_and_links_not_followed(tmp_path: Path) -> None:
    tree(tmp_path, {"a.txt": "abc"})
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "etc").symlink_to("/etc")
    size = measure_workspace(WorkspaceSource(tmp_path))
    assert (size.copy.files, size.copy.bytes) == (2, 3 + len("/etc"))


def test_a_workspace_of_too_many_entries_is_refused_early(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty files cost the kernel an inode each, outside the job's memory limit."""
    monkeypatch.setattr(workspace, "MAX_ENTRIES", 50)
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
        for j in range(20):
            (tmp_path / f"d{i}" / f"f{j}").touch()
    with pytest.raises(UsageError, match="more than 50 files, links and directories"):
        measure_workspace(WorkspaceSource(tmp_path))
