"""The workspace archive: pack, check and unpack on real tar bytes, and every hostile shape an
archive from a pull request can take (built here with tarfile or as raw header bytes). Every
hostile archive is unpacked only under the test's own temporary directory."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.errors import SandboxError, UsageError
from stockade.sandbox import archive, workspace
from stockade.sandbox.archive import (
    ArchiveInfo,
    ArchiveLimits,
    ArchiveRefused,
    check,
    pack,
    unpack,
)
from stockade.sandbox.interface import WorkspaceSource

LIMITS = ArchiveLimits(max_bytes=1 << 20, max_entries=100)
T = 1_600_000_000
Member = tuple[tarfile.TarInfo, bytes | None]


# --- building archives ----------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
           link: str = "", claim: int | None = None, **pax: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, T
    info.size = len(data) if claim is None else claim
    info.pax_headers = pax
    return info, (data if claim is None and (data or kind == tarfile.REGTYPE) else None)


def tar(*members: Member, fmt: int = tarfile.PAX_FORMAT, **global_pax: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax) as t:
        for info, data in members:
            t.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def gz(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def tgz(*members: Member, **global_pax: str) -> bytes:
    return gz(tar(*members, **global_pax))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refused(tmp_path: Path, data: bytes, limits: ArchiveLimits = LIMITS) -> ArchiveRefused:
    """check refuses ``data``, and unpack refuses it with the same message, writing nothing
    outside its destination."""
    with pytest.raises(ArchiveRefused) as checked:
        check(io.BytesIO(data), limits)
    base = Path(tempfile.mkdtemp(dir=tmp_path))  # one per call: a test may make several
    (base / "outside").mkdir()
    (base / "a.tgz").write_bytes(data)
    with pytest.raises(ArchiveRefused) as unpacked:
        unpack(base / "a.tgz", base / "dest", limits, sha(data))
    assert unpacked.value.message == checked.value.message
    assert list((base / "outside").iterdir()) == []
    return checked.value


def rechecksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


# --- trees on disk --------------------------------------------------------------------------

def snapshot(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Every path under ``root`` (links not followed): kind, mode, mtime, contents/target."""
    out: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(root)
    for top, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(top, name)
            st_ = os.lstat(path)
            rel, mode, mtime = os.path.relpath(path, base), stat.S_IMODE(st_.st_mode), \
                st_.st_mtime_ns // 10**9
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path), mtime)
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", mode, mtime)
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", mode, mtime, Path(os.fsdecode(path)).read_bytes())
            else:
                out[rel] = ("other", mode)
    return out


LONG_DIR = "d" * 120 + "/" + "e" * 120


def workspace_tree(root: Path) -> Path:
    files = {"src/main.py": (b"print('hi')\n", 0o644), "src/run.sh": (b"#!/bin/sh\n", 0o755),
             "src/secret.txt": (b"s", 0o600), "src/suid": (b"#!", 0o755), "wide.txt": (b"w", 0o777),
             "ro/f": (b"f", 0o444), "\u00fcn\u00efcode.txt": (b"u", 0o644),
             "x" * 150: (b"long", 0o644), f"{LONG_DIR}/f.txt": (b"deep", 0o640),
             ".stockadeignore": (b"*.log\nbuild/\n", 0o644), "app.log": (b"log", 0o644),
             "build/out.o": (b"o", 0o644), "node_modules/m.js": (b"m", 0o644),
             "big.bin": (os.urandom(70_000), 0o644)}
    for rel, (content, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    bad = os.path.join(os.fsencode(root), b"bad\xff name")  # not UTF-8: hdrcharset=BINARY
    Path(os.fsdecode(bad)).write_bytes(b"b")
    (root / "empty").mkdir()
    (root / "src/link").symlink_to("main.py")
    (root / "src/up").symlink_to("../wide.txt")
    (root / "dirlink").symlink_to("src")
    (root / "longlink").symlink_to(f"{LONG_DIR}/f.txt")  # > 100 bytes: a pax linkpath
    os.mkfifo(root / "fifo")  # left out, as by the local copy
    (root / "ro").chmod(0o555)
    (root / "src/suid").chmod(0o6755)  # packed without setuid, setgid and sticky bits
    (root / "empty").chmod(0o1777)
    # times with fractions, deepest first so that no later change moves a directory's
    for n, path in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(path, ns=(0, (T + n) * 10**9 + 750_000_000), follow_symlinks=False)
    return root


def packed(root: Path, *excludes: str, limit: int = 1 << 30) -> tuple[bytes, ArchiveInfo]:
    out = io.BytesIO()
    info = pack(WorkspaceSource(root, excludes), out, limit)
    return out.getvalue(), info


# --- pack, check, unpack --------------------------------------------------------------------

def test_round_trip_gives_the_tree_back_without_excludes_and_with_masked_modes(
        tmp_path: Path) -> None:
    src = workspace_tree(tmp_path / "ws")
    data, info = packed(src, "node_modules/")
    assert info == check(io.BytesIO(data), ArchiveLimits.for_workspace(1 << 30))
    assert (info.sha256, info.size) == (sha(data), len(data))
    (tmp_path / "a.tgz").write_bytes(data)
    assert unpack(tmp_path / "a.tgz", tmp_path / "dest", LIMITS, info.sha256) == info

    expected = {}
    for rel, entry in snapshot(src).items():
        if rel.split(b"/")[0] in (b"app.log", b"build", b"node_modules", b"fifo"):
            continue
        if entry[0] in ("dir", "file"):  # group and others lose write; times whole seconds
            entry = (entry[0], entry[1] & 0o755, *entry[2:])
        expected[rel] = entry
    got = snapshot(tmp_path / "dest")
    assert got == expected
    assert got[b"wide.txt"][1] == 0o755 and got[b"src/secret.txt"][1] == 0o600
    assert got[b"ro"] == ("dir", 0o555, got[b"ro"][2])
    assert got[b"empty"][:2] == ("dir", 0o755) and got[b"src/suid"][1] == 0o755
    assert got[b"src/up"] == ("link", b"../wide.txt", got[b"src/up"][2])
    assert got[b"bad\xff name"][0] == "file"
    assert info.files == sum(e[0] in ("file", "link") for e in expected.values())
    assert info.bytes == sum(len(e[3]) for e in expected.values() if e[0] == "file")
    assert stat.S_IMODE(os.stat(tmp_path / "dest").st_mode) == 0o700


def test_an_empty_workspace_round_trips_and_the_limits_follow_the_workspace(
        tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    data, info = packed(tmp_path / "ws")
    assert (info.files, info.bytes, len(data) < 100) == (0, 0, True)
    (tmp_path / "a.tgz").write_bytes(data)
    assert unpack(tmp_path / "a.tgz", tmp_path / "dest", LIMITS, info.sha256) == info
    assert list((tmp_path / "dest").iterdir()) == []
    limits = ArchiveLimits.for_workspace(5 << 20)
    assert limits == (5 << 20, workspace.MAX_ENTRIES, 4096, 300)
    assert limits.max_stream == (5 << 20) + workspace.MAX_ENTRIES * 2048 + 10240


def test_packing_is_deterministic_and_keeps_mtimes(tmp_path: Path) -> None:
    src = workspace_tree(tmp_path / "ws")
    first, info = packed(src)
    assert packed(src) == (first, info)
    with tarfile.open(fileobj=io.BytesIO(first)) as t:  # only reading names and fields here
        members = t.getmembers()
    assert all((m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "") for m in members)
    assert not any(m.mode & 0o7000 for m in members)
    top = [m.name for m in members if "/" not in m.name]
    assert top == sorted(top)
    os.utime(src / "src/main.py", (T, T + 5))
    assert packed(src)[1].sha256 != info.sha256


def test_pack_refuses_a_workspace_over_the_limit(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    with pytest.raises(UsageError, match="take the files past 999 bytes"):
        packed(tmp_path, limit=999)
    assert packed(tmp_path, limit=1000)[1].bytes == 1000


def test_pack_refuses_too_many_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(4):
        (tmp_path / str(n)).write_text("")
    monkeypatch.setattr(workspace, "MAX_ENTRIES", 3)
    with pytest.raises(UsageError, match="more than 3 files"):
        packed(tmp_path)


def test_pack_refuses_a_file_that_shrinks_while_packed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_text("short")
    real_fstat = os.fstat

    def larger(fd: int) -> Any:  # as if the file lost 100 bytes after fstat
        st_ = real_fstat(fd)
        fields = {name: getattr(st_, name) for name in dir(st_) if name.startswith("st_")}
        return types.SimpleNamespace(**{**fields, "st_size": st_.st_size + 100})

    monkeypatch.setattr(os, "fstat", larger)
    with pytest.raises(UsageError, match="f shrank while the workspace was packed"):
        packed(tmp_path)


def test_pack_refuses_a_file_it_cannot_read(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret").write_text("s")  # as root every file is readable: make one not
    real_open = os.open

    def deny(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "secret" and not flags & os.O_DIRECTORY:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(UsageError, match=r"Permission denied \(secret\)"):
        packed(tmp_path)


@pytest.mark.parametrize(("make", "why"), [
    (lambda p: (p / "py").symlink_to("/usr/bin/python3"), "is absolute"),
    (lambda p: (p / "up").symlink_to("../.."), "outside the archive's tree"),
    (lambda p: (p / "a\x1b[2Jb").write_text(""), "control character"),
])
def test_pack_refuses_what_a_runner_would(tmp_path: Path, make: Callable[[Path], object],
                                          why: str) -> None:
    make(tmp_path)
    with pytest.raises(UsageError, match=why) as e:
        packed(tmp_path)
    assert "\x1b" not in e.value.message


def test_zeros_pack_under_the_ratio_and_a_lower_ratio_is_enforced_by_pack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "zeros.img", "wb") as f:
        f.truncate(64 << 20)  # sparse: reads as zeros
    data, info = packed(tmp_path)
    assert check(io.BytesIO(data), ArchiveLimits.for_workspace(1 << 30)) == info
    monkeypatch.setattr(ArchiveLimits, "for_workspace",
                        classmethod(lambda cls, n: cls(max_bytes=n, max_ratio=100)))
    with pytest.raises(UsageError, match="inflate more than 100 times"):
        packed(tmp_path)


# --- check: every refusal -------------------------------------------------------------------

def test_an_absolute_name_is_refused(tmp_path: Path) -> None:
    assert "absolute" in refused(tmp_path, tgz(member("/etc/passwd", data=b"x"))).message


@pytest.mark.parametrize("name", ["../x", "a/../../x"])
def test_a_dotdot_component_is_refused(tmp_path: Path, name: str) -> None:
    members = [member("a", tarfile.DIRTYPE, mode=0o755), member(name, data=b"x")]
    assert "'..' component" in refused(tmp_path, tgz(*members)).message


@pytest.mark.parametrize("name", ["./x", "a//x", ""])
def test_an_empty_or_dot_component_is_refused(tmp_path: Path, name: str) -> None:
    assert "component" in refused(tmp_path, tgz(member(name, data=b"x"))).problem


def test_a_control_character_in_a_name_is_refused_and_escaped(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("evil\x1b]52;c;aGk=\x07\nname", data=b"x")))
    assert "control character" in e.message
    assert "\x1b" not in e.message and "\n" not in e.message and "\x07" not in e.message
    assert "evil\\x1b]52;c;aGk=\\x07\\nname" in e.message


def test_names_too_long_are_refused_and_cut_in_the_message(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("a" * 5000, data=b"x")))
    assert "longer than 4096 bytes" in e.message and len(e.message) < 400
    e = refused(tmp_path, tgz(member("a" * 256, data=b"x")))
    assert "longer than 255 bytes" in e.message


def test_a_link_to_an_absolute_path_is_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("etc", tarfile.SYMTYPE, link="/etc")))
    assert "'/etc' is absolute" in e.message


@pytest.mark.parametrize("target", ["../../..", "..", "d/../../x"])
def test_a_link_out_of_the_tree_is_refused(tmp_path: Path, target: str) -> None:
    e = refused(tmp_path, tgz(member("x", tarfile.SYMTYPE, link=target)))
    assert "outside the archive's tree" in e.message or "'..' after a name" in e.message


def test_a_link_chain_that_escapes_physically_is_refused(tmp_path: Path) -> None:
    up = [member("a", tarfile.DIRTYPE, mode=0o755), member("a/b", tarfile.SYMTYPE, link="..")]
    ok = tgz(*up, member("c", tarfile.SYMTYPE, link="a/b/x"))
    assert check(io.BytesIO(ok), LIMITS).files == 2
    e = refused(tmp_path, tgz(*up, member("c", tarfile.SYMTYPE, link="a/b/..")))
    assert "'..' after a name" in e.message


@pytest.mark.parametrize("target", ["victim", "d"])
def test_an_entry_through_a_link_of_the_archive_is_refused(tmp_path: Path,
                                                          target: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    link = str(victim) if target == "victim" else "d"
    e = refused(tmp_path, tgz(member("a", tarfile.SYMTYPE, link=link),
                              member("a/passwd", data=b"owned"),
                              member("d", tarfile.DIRTYPE, mode=0o755)))
    assert "is absolute" in e.message if target == "victim" else "under the symbolic link 'a'"
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("second", [
    member("a/passwd", data=b"owned"),
    member("a", tarfile.DIRTYPE, mode=0o755),
    member("a", data=b"owned"),
], ids=["file-under-link", "dir-over-link", "file-over-link"])
def test_unpack_never_follows_a_link_even_unchecked(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   second: Member) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    monkeypatch.setattr(archive._Tree, "add", lambda self, m: None)  # no checks at all
    data = tgz(member("a", tarfile.SYMTYPE, link=str(victim / "passwd")), second)
    (tmp_path / "a.tgz").write_bytes(data)
    with pytest.raises((ArchiveRefused, SandboxError)):
        unpack(tmp_path / "a.tgz", tmp_path / "dest", LIMITS, sha(data))
    assert list(victim.iterdir()) == []
    assert os.readlink(tmp_path / "dest/a") == str(victim / "passwd")


def test_an_entry_under_a_file_or_without_its_directory_is_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("a", data=b"x"), member("a/b", data=b"y")))
    assert "under the file 'a'" in e.message
    e = refused(tmp_path, tgz(member("d/x", data=b"x")))
    assert "its directory 'd' is not the one open here" in e.message
    e = refused(tmp_path, tgz(member("a", tarfile.DIRTYPE, mode=0o755),
                              member("a/x", data=b"x"), member("c/y", data=b"y")))
    assert "its directory 'c' is not the one open here" in e.message
    e = refused(tmp_path, tgz(member("a", tarfile.DIRTYPE, mode=0o755),
                              member("a/l", tarfile.SYMTYPE, link="."), member("c/l/y")))
    assert "its directory 'c/l' is not the one open here" in e.message


@pytest.mark.parametrize("target", ["/etc/passwd", "a"])
def test_hard_links_are_refused(tmp_path: Path, target: str) -> None:
    e = refused(tmp_path, tgz(member("a", data=b"x"), member("b", tarfile.LNKTYPE, link=target)))
    assert "a hard link" in e.message


@pytest.mark.parametrize(("kind", "what"), [
    (tarfile.CHRTYPE, "a character device"), (tarfile.BLKTYPE, "a block device"),
    (tarfile.FIFOTYPE, "a FIFO"), (tarfile.CONTTYPE, "an entry of type '7'"),
])
def test_devices_fifos_and_other_types_are_refused(tmp_path: Path, kind: bytes,
                                                   what: str) -> None:
    assert what in refused(tmp_path, tgz(member("dev", kind))).message


@pytest.mark.parametrize(("kind", "mode"), [
    (tarfile.REGTYPE, 0o4755), (tarfile.REGTYPE, 0o2755), (tarfile.DIRTYPE, 0o1777)])
def test_setuid_setgid_and_sticky_bits_are_refused(tmp_path: Path, kind: bytes,
                                                   mode: int) -> None:
    e = refused(tmp_path, tgz(member("x", kind, mode=mode)))
    assert f"mode {mode:o} has setuid, setgid or sticky bits" in e.message


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE])
def test_a_duplicate_name_is_refused(tmp_path: Path, kind: bytes) -> None:
    assert "appears twice" in refused(tmp_path, tgz(member("a", kind), member("a", kind))).message


def test_data_or_a_target_on_the_wrong_kind_of_entry_is_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("d", tarfile.DIRTYPE, data=b"0123456789")))
    assert "a dir with 10 bytes of data" in e.message
    e = refused(tmp_path, tgz(member("f", data=b"x", link="elsewhere")))
    assert "a file with a link target" in e.message


def test_entries_out_of_order_are_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("b", data=b"1"), member("a", data=b"2")))
    assert "out of (sorted) order" in e.message


def test_a_ten_gigabyte_size_claim_is_refused_without_reading(tmp_path: Path) -> None:
    started = time.monotonic()
    e = refused(tmp_path, tgz(member("big", claim=8**11 - 1)))  # the largest ustar size
    assert "take the files past 1048576 bytes" in e.message
    assert time.monotonic() - started < 5
    e = refused(tmp_path, tgz(member("big", claim=10 * 1024**3)))  # tarfile: pax size, ustar 0
    assert "pax size '10737418240' disagrees with its header's 0" in e.message


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_SPARSE, tarfile.REGTYPE])
def test_gnu_sparse_members_are_refused(tmp_path: Path, kind: bytes) -> None:
    sparse = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
              "GNU.sparse.realsize": str(10 * 1024**3)}
    e = refused(tmp_path, tgz(member("sparse", kind, data=b"x" * 512, **sparse)))
    assert "a GNU sparse member" in e.message


@pytest.mark.parametrize(("pax", "why"), [
    ({"path": "evil"}, "pax path disagrees"), ({"size": "5"}, "pax size '5' disagrees"),
    ({"comment": "hi"}, "pax key 'comment' is not accepted"),
    ({"hdrcharset": "latin1"}, "unknown pax hdrcharset")])
def test_pax_headers_that_disagree_or_are_unknown_are_refused(tmp_path: Path,
                                                              pax: dict[str, str],
                                                              why: str) -> None:
    assert why in refused(tmp_path, tgz(member("good", data=b"0123456789", **pax))).message


def test_a_pax_linkpath_that_disagrees_is_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("l", tarfile.SYMTYPE, link="x", linkpath="y")))
    assert "pax linkpath disagrees" in e.message


def test_global_pax_headers_and_gnu_or_old_headers_are_refused(tmp_path: Path) -> None:
    e = refused(tmp_path, tgz(member("a", data=b"x"), comment="hi"))
    assert "a global pax header" in e.message
    gnu = gz(tar(member("n" * 150, data=b"x"), fmt=tarfile.GNU_FORMAT))
    assert "not a POSIX (ustar) tar header" in refused(tmp_path, gnu).message


def test_data_hidden_in_padding_or_a_huge_pax_header_is_refused(tmp_path: Path) -> None:
    raw = bytearray(tar(member("a", data=b"x")))
    raw[512 + 100] = 1
    assert "data in the padding" in refused(tmp_path, gz(bytes(raw))).message
    e = refused(tmp_path, tgz(member("a", comment="x" * 10_000)))
    assert "a pax header of 10015 bytes" in e.message


def test_a_bad_checksum_or_number_is_refused(tmp_path: Path) -> None:
    raw = bytearray(tar(member("a", data=b"x")))
    raw[0:1] = b"b"
    assert "checksum is wrong" in refused(tmp_path, gz(bytes(raw))).message
    raw[124:136] = b"\x80" + bytes(10) + b"\x01"  # base-256 size
    raw[:512] = rechecksum(raw[:512])
    assert "not octal" in refused(tmp_path, gz(bytes(raw))).message


def test_a_gzip_bomb_is_refused_by_its_ratio(tmp_path: Path) -> None:
    data = gz(tar(member("zeros", data=bytes(64 << 20))), level=9)
    assert len(data) < 100_000
    e = refused(tmp_path, data, ArchiveLimits.for_workspace(1 << 30))
    assert "inflates more than 300 times" in e.message


def test_an_archive_inflating_past_the_absolute_bound_is_refused(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_bytes=0, max_entries=1, max_name=100_000, max_ratio=10**6)
    data = tgz(member("a", comment="x" * 50_000))
    assert f"inflates to more than {limits.max_stream}" in refused(tmp_path, data, limits).message


def test_too_large_archives_are_refused(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_bytes=1000, max_entries=2)
    noise = tgz(member("noise", data=os.urandom(100_000)))
    assert f"larger than {limits.max_stream} bytes" in refused(tmp_path, noise, limits).message
    e = refused(tmp_path, tgz(member("a", data=bytes(600)), member("b", data=bytes(600))), limits)
    assert "its 600 bytes take the files past 1000 bytes" in e.message


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    data = tgz(*(member(f"f{n}", data=b"x") for n in range(4)))
    e = refused(tmp_path, data, LIMITS._replace(max_entries=3))
    assert "more than 3 entries" in e.message


def test_truncated_archives_are_refused(tmp_path: Path) -> None:
    whole = tar(member("a", data=b"x" * 3000))
    cases = {
        gz(whole[:1500]): "the tar stream ends early",
        gz(whole)[:-10]: "gzip stream does not end",
        gz(whole[:512 * 7]): "the tar stream ends early",  # a header, 6 blocks of data
        gz(whole[:512 * 8]): "a closing zero block is missing",  # and 1 zero block
    }
    for data, why in cases.items():
        assert why in refused(tmp_path, data).message


def test_trailing_garbage_is_refused(tmp_path: Path) -> None:
    whole = tar(member("a", data=b"x"))
    assert "after the end of the tar archive" in refused(tmp_path, gz(whole + b"junk")).message
    assert "more than" in refused(tmp_path, gz(whole + bytes(1 << 20))).message
    for data in (gz(whole) + b"junk", gz(whole) + gz(b"")):
        assert "after the end of the gzip stream" in refused(tmp_path, data).message
    assert "not gzip data" in refused(tmp_path, whole).message


# --- unpack ---------------------------------------------------------------------------------

def test_unpack_checks_the_sha256_first_and_needs_an_empty_destination(tmp_path: Path) -> None:
    data = tgz(member("a", data=b"x"))
    (tmp_path / "a.tgz").write_bytes(data)
    with pytest.raises(ArchiveRefused, match="its sha256 is"):
        unpack(tmp_path / "a.tgz", tmp_path / "dest", LIMITS, sha(b"other"))
    assert not (tmp_path / "dest").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("")
    with pytest.raises(SandboxError, match="not empty"):
        unpack(tmp_path / "a.tgz", tmp_path / "full", LIMITS, sha(data))
    (tmp_path / "empty").mkdir(mode=0o755)
    assert unpack(tmp_path / "a.tgz", tmp_path / "empty", LIMITS, sha(data)).files == 1
    assert stat.S_IMODE(os.stat(tmp_path / "empty").st_mode) == 0o700
    assert (tmp_path / "empty/a").read_bytes() == b"x"


# --- any archive at all ---------------------------------------------------------------------

COMPONENTS = st.sampled_from(["a", "b", "c"] * 12 + ["..", ".", "", "\x01"])
NAMES = st.lists(COMPONENTS, min_size=1, max_size=4).map("/".join)
TARGETS = st.one_of(NAMES, st.sampled_from(["/abs", "../..", "a/../..", ".", "..", "../a"]))
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE] * 8
                        + [tarfile.LNKTYPE, tarfile.FIFOTYPE])
MODES = st.sampled_from([0o644, 0o755, 0o777, 0o600] * 5 + [0o4755])
MEMBERS = st.lists(st.tuples(NAMES, KINDS, TARGETS, MODES), max_size=8)


def tidied(entries: list[tuple[str, bytes, str, int]]) -> list[tuple[str, bytes, str, int]]:
    """The entries with their directories added, once each, depth first and sorted (most
    such archives are acceptable, unless a name or a target is not)."""
    tree = {tuple(name.split("/")): (name, kind, target, mode)
            for name, kind, target, mode in entries}
    for parts in list(tree):
        for n in range(1, len(parts)):
            tree[parts[:n]] = ("/".join(parts[:n]), tarfile.DIRTYPE, "", 0o755)
    return [tree[parts] for parts in sorted(tree)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(MEMBERS, st.sampled_from([True, True, True, False]))
def test_any_archive_is_refused_or_unpacks_only_under_dest(
        entries: list[tuple[str, bytes, str, int]], tidy: bool) -> None:
    if tidy:
        entries = tidied(entries)
    members = [member(name, kind, data=b"d" if kind == tarfile.REGTYPE else b"", mode=mode,
                      link=target if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "")
               for name, kind, target, mode in entries]
    data = tgz(*members)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "outside").mkdir()
        (base / "a.tgz").write_bytes(data)
        try:
            checked: ArchiveInfo | None = check(io.BytesIO(data), LIMITS)
        except ArchiveRefused:
            checked = None
        try:
            unpacked = unpack(base / "a.tgz", base / "dest", LIMITS, sha(data))
        except ArchiveRefused:
            assert checked is None
            return
        assert unpacked == checked
        assert list((base / "outside").iterdir()) == []
        dest = os.path.realpath(base / "dest")
        for rel, entry in snapshot(base / "dest").items():
            assert entry[0] in ("dir", "file", "link")
            if entry[0] == "link":
                where = os.path.dirname(os.path.join(dest.encode(), rel))
                resolved = os.path.normpath(os.path.join(where, entry[1]))
                assert resolved == dest.encode() or resolved.startswith(dest.encode() + b"/")
            else:
                assert not entry[1] & 0o7022
