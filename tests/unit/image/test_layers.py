"""Applying OCI image layers: real tar bytes (built here with tarfile or as raw headers) applied
onto real trees. Benign layers are applied in the test process; every hostile one only in a
confined child (tests/support/confined.py: uid 65534 outside, nothing writable but the box)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.image.layers import (
    LayerInfo,
    LayerLimits,
    LayerRefused,
    UnpackError,
    apply_layer,
    unpack_image,
)
from tests.support.confined import Box, box, run_confined

TAR = "application/vnd.oci.image.layer.v1.tar"
TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LIMITS = LayerLimits(max_bytes=64 << 20, max_entries=1000, max_file=48 << 20, max_ratio=50,
                     ratio_slack=1 << 20)
T = 1_600_000_000
Member = tuple[tarfile.TarInfo, bytes | None]


# --- building layers ------------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
           link: str = "", claim: int | None = None, mtime: int = T, uid: int = 0,
           **pax: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, mtime
    info.uid = info.gid = uid
    info.size = len(data) if claim is None else claim
    info.pax_headers = pax
    return info, (data if claim is None and kind == tarfile.REGTYPE else None)


def d(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return member(name, tarfile.DIRTYPE, mode=mode, **kw)


def f(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Member:
    return member(name, data=data, mode=mode, **kw)


def sym(name: str, target: str) -> Member:
    return member(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hard(name: str, target: str) -> Member:
    return member(name, tarfile.LNKTYPE, link=target)


def tar(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            t.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def tgz(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return gzip.compress(tar(*members, fmt=fmt), mtime=0)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def apply(root: Path, data: bytes, media_type: str = TGZ,
          limits: LayerLimits = LIMITS) -> LayerInfo:
    return apply_layer(io.BytesIO(data), media_type, root, limits)


def names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- the confined child ---------------------------------------------------------------------

APPLY = """
from stockade.image.layers import LayerLimits, apply_layer
infos = []
for path, media_type in params["layers"]:
    with open(path, "rb") as f:
        infos.append(apply_layer(f, media_type, params["root"],
                                 LayerLimits(**params["limits"]))._asdict())
result = infos
"""

UNPACK = """
from pathlib import Path
from stockade.image.layers import LayerLimits, unpack_image
layers = [(Path(p), m, e) for p, m, e in params["layers"]]
result = [i._asdict() for i in unpack_image(layers, Path(params["dest"]),
                                            LayerLimits(**params["limits"]))]
"""


@pytest.fixture
def cbox() -> Iterator[Box]:
    with box() as b:
        os.mkdir(b.work / "tree")
        os.mkdir(b.work / "outside")
        (b.work / "outside" / "keep").write_text("mine")
        for p in (b.work / "tree", b.work / "outside", b.work / "outside" / "keep"):
            os.chown(p, 65534, 65534)
        yield b


def confined(b: Box, *layers: bytes, media_type: str = TGZ,
             limits: LayerLimits = LIMITS) -> dict[str, Any]:
    """Apply ``layers`` in order onto ``b.work/tree`` in the confined child; its answer.
    Whatever happened, nothing outside the tree changed."""
    shutil.rmtree(b.work / "tree")
    os.mkdir(b.work / "tree")
    os.chown(b.work / "tree", 65534, 65534)
    paths = []
    for i, data in enumerate(layers):
        path = b.root / f"layer{i}"
        path.write_bytes(data)
        paths.append([str(path), media_type])
    answer = run_confined(b, APPLY, layers=paths, root=str(b.work / "tree"),
                          limits=limits._asdict())
    assert names(b.work / "outside") == ["keep"]
    assert (b.work / "outside" / "keep").read_text() == "mine"
    assert sorted(os.listdir(b.work)) == ["outside", "tree"]
    return answer


def refused(b: Box, *layers: bytes, **kw: Any) -> str:
    answer = confined(b, *layers, **kw)
    assert not answer["ok"] and answer["error"] == "LayerRefused", answer
    message: str = answer["message"]
    assert "\x1b" not in message and "\0" not in message
    return message


def test_confinement_holds(cbox: Box) -> None:
    probe = """
import os, socket
outcome = {"uid": os.getuid()}
for path in params["paths"]:
    try:
        open(path, "w").close()
        outcome[path] = "written"
    except OSError as e:
        outcome[path] = e.strerror
try:
    socket.create_connection(("127.0.0.1", 22), timeout=2)
    outcome["net"] = "connected"
except OSError as e:
    outcome["net"] = e.strerror
open(params["mine"], "w").close()
result = outcome
"""
    outside = [str(cbox.root / "x"), "/var/tmp/stockade-probe", "/work/main/probe", "/etc/probe",
               "/root/probe"]
    answer = run_confined(cbox, probe, paths=outside, mine=str(cbox.work / "mine"))
    assert answer["ok"], answer
    result = answer["result"]
    assert result["uid"] == 0  # root inside ...
    assert os.stat(cbox.work / "mine").st_uid == 65534  # ... and nobody outside
    assert all(result[p] != "written" for p in outside), result
    assert not any(os.path.exists(p) for p in outside)
    assert result["net"] != "connected"


# --- benign layers --------------------------------------------------------------------------

def test_files_dirs_links_modes_and_mtimes(tmp_path: Path) -> None:
    raw = tar(d("./etc", 0o750, mtime=T + 1), f("./etc/conf", b"x = 1\n", 0o640, uid=1000),
              d("usr/bin", mtime=T + 2), f("usr/bin/tool", b"#!/bin/sh\n", 0o755, mtime=T + 3),
              sym("usr/bin/abs", "/usr/bin/tool"), sym("rel", "usr/bin/../bin/tool"),
              hard("usr/bin/again", "usr/bin/tool"), d("./"))
    data = gzip.compress(raw, mtime=0)
    info = apply(tmp_path, data)
    assert info.diff_id == sha(raw) and info.digest == sha(data) and info.size == len(data)
    assert (info.tar_size, info.entries, info.files, info.bytes) == (len(raw), 9, 3, 16)
    assert names(tmp_path) == ["etc", "etc/conf", "rel", "usr", "usr/bin", "usr/bin/abs",
                               "usr/bin/again", "usr/bin/tool"]
    conf, tool = os.lstat(tmp_path / "etc/conf"), os.lstat(tmp_path / "usr/bin/tool")
    assert (stat.S_IMODE(conf.st_mode), conf.st_uid, conf.st_mtime) == (0o640, 0, T)
    assert (stat.S_IMODE(tool.st_mode), tool.st_mtime) == (0o755, T + 3)
    assert os.lstat(tmp_path / "usr/bin/again").st_ino == tool.st_ino
    assert os.readlink(tmp_path / "usr/bin/abs") == "/usr/bin/tool"
    assert os.readlink(tmp_path / "rel") == "usr/bin/../bin/tool"
    assert os.lstat(tmp_path / "rel").st_mtime == T
    etc, usr_bin = os.lstat(tmp_path / "etc"), os.lstat(tmp_path / "usr/bin")
    assert (stat.S_IMODE(etc.st_mode), etc.st_mtime) == (0o750, T + 1)
    assert usr_bin.st_mtime == T + 2
    assert stat.S_IMODE(os.lstat(tmp_path / "usr").st_mode) == 0o755  # made as a parent


def test_layers_in_order(tmp_path: Path) -> None:
    apply(tmp_path, tgz(d("etc"), f("etc/a", b"one"), f("etc/b", b"b"), sym("l", "etc/a")))
    apply(tmp_path, tgz(f("etc/a", b"two", 0o600), d("etc", 0o700), sym("l", "etc/b"),
                        f("etc/c", b"c")))
    assert (tmp_path / "etc/a").read_bytes() == b"two"
    assert stat.S_IMODE(os.lstat(tmp_path / "etc/a").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(tmp_path / "etc").st_mode) == 0o700
    assert os.readlink(tmp_path / "l") == "etc/b"
    assert names(tmp_path) == ["etc", "etc/a", "etc/b", "etc/c", "l"]


def test_formats_and_long_names(tmp_path: Path) -> None:
    long = "d/" + "n" * 150 + "/" + "é" * 80
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        root = tmp_path / str(fmt)
        root.mkdir()
        short = f"x{fmt}"
        members = [f(short, b"s"), sym("link", "t" * (150 if fmt != tarfile.USTAR_FORMAT else 90))]
        if fmt != tarfile.USTAR_FORMAT:
            members.append(f(long, b"long"))
        apply(root, tar(*members, fmt=fmt), TAR)
        assert (root / short).read_bytes() == b"s"
        if fmt != tarfile.USTAR_FORMAT:
            assert (root / long).read_bytes() == b"long"


def test_multi_member_gzip_and_plain_tar(tmp_path: Path) -> None:
    raw = tar(f("a", b"1"), f("b", b"2"))
    data = gzip.compress(raw[:1000], mtime=0) + gzip.compress(raw[1000:], mtime=0)
    (tmp_path / "gz").mkdir()
    (tmp_path / "tar").mkdir()
    assert apply(tmp_path / "gz", data).diff_id == sha(raw)
    assert apply(tmp_path / "tar", raw, TAR).diff_id == sha(raw)
    assert names(tmp_path / "gz") == names(tmp_path / "tar") == ["a", "b"]


def test_whiteouts(tmp_path: Path) -> None:
    apply(tmp_path, tgz(d("etc"), f("etc/gone"), d("etc/tree"), f("etc/tree/x"), f("etc/kept")))
    info = apply(tmp_path, tgz(f("etc/.wh.gone"), f("etc/.wh.tree"), f("etc/.wh.absent"),
                               f(".wh.nothing/.wh.x"), f("etc/.wh..wh.plnk")))
    assert names(tmp_path) == ["etc", "etc/kept"]
    assert (info.whiteouts, info.skipped) == (4, 1)


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_whiteout_spares_the_same_layer(tmp_path: Path, whiteout_first: bool) -> None:
    apply(tmp_path, tgz(f("a", b"lower"), d("dir"), f("dir/lower")))
    entries = [f(".wh.a"), f(".wh.dir")]
    mine = [f("a", b"upper"), f("dir/upper")]
    apply(tmp_path, tgz(*(entries + mine if whiteout_first else mine + entries)))
    assert (tmp_path / "a").read_bytes() == b"upper"
    assert names(tmp_path) == ["a", "dir", "dir/upper"]


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_directory_either_order(tmp_path: Path, opaque_first: bool) -> None:
    apply(tmp_path, tgz(d("d"), f("d/old"), d("d/sub"), f("d/sub/old"), d("d/gone"),
                        f("d/gone/x"), f("other")))
    mine = [f("d/new", b"n"), d("d/sub"), f("d/sub/new"), f("d/implicit/deep")]
    marker = [f("d/.wh..wh..opq")]
    apply(tmp_path, tgz(*(marker + mine if opaque_first else mine + marker)))
    assert names(tmp_path) == ["d", "d/implicit", "d/implicit/deep", "d/new", "d/sub",
                               "d/sub/new", "other"]


def test_names_made_relative_and_clean(tmp_path: Path) -> None:
    mode = os.lstat(tmp_path).st_mode
    apply(tmp_path, tgz(f("/abs", b"a"), f("./dot/./x", b"b"), f("//double//y", b"c"), d("./"),
                        d("/")))
    assert names(tmp_path) == ["abs", "dot", "dot/x", "double", "double/y"]
    assert os.lstat(tmp_path).st_mode == mode  # the root entries are ignored


def test_media_types(tmp_path: Path) -> None:
    with pytest.raises(LayerRefused, match="media type 'text/plain' is not a layer type"):
        apply(tmp_path, tar(f("a")), "text/plain")
    data = tar(f("z", b"zstd"))
    if importlib.util.find_spec("zstandard") is None:
        with pytest.raises(LayerRefused, match="need the Python module 'zstandard'"):
            apply(tmp_path, data, ZSTD)
    else:  # pragma: no cover - not installed on the project's machines
        zstandard = importlib.import_module("zstandard")
        assert apply(tmp_path, zstandard.ZstdCompressor().compress(data), ZSTD).diff_id == sha(
            data)
        assert (tmp_path / "z").read_bytes() == b"zstd"


HEADER = f("a")[0].tobuf(tarfile.PAX_FORMAT)


@pytest.mark.parametrize(("data", "problem"), [
    (HEADER + bytes(512), "truncated"),
    (HEADER, "truncated"),
    (HEADER + bytes(512) + HEADER + bytes(1024), "a header after a zero block"),
    (tar(f("a")) + b"junk", "data after the end of the tar archive"),
    (b"x" * 1024, "not a ustar, pax or GNU tar header"),
    (tar(f("a"))[:148] + b"0000000\0" + tar(f("a"))[156:], "checksum is wrong"),
])
def test_malformed_tar(tmp_path: Path, data: bytes, problem: str) -> None:
    with pytest.raises(LayerRefused, match=problem):
        apply(tmp_path, data, TAR)


def test_corrupt_and_truncated_gzip(tmp_path: Path) -> None:
    data = tgz(f("a", os.urandom(5000)))
    with pytest.raises(LayerRefused, match="gzip stream does not end"):
        apply(tmp_path, data[:-100])
    with pytest.raises(LayerRefused, match="not gzip data"):
        apply(tmp_path, b"\x1f\x8b" + bytes(50))


def unpack_layers(tmp_path: Path, *layers: bytes) -> list[tuple[Path, str, str]]:
    out = []
    for i, data in enumerate(layers):
        path = tmp_path / f"layer{i}.tgz"
        path.write_bytes(data)
        out.append((path, TGZ, sha(gzip.decompress(data))))
    return out


def test_unpack_image_publishes(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    layers = unpack_layers(tmp_path, tgz(d("etc"), f("etc/a", b"1")), tgz(f("etc/.wh.a"),
                                                                           f("etc/b", b"2")))
    dest = tmp_path / "cache" / "chain"
    infos = unpack_image(layers, dest, LIMITS)
    assert [i.diff_id for i in infos] == [e for _, _, e in layers]
    assert names(dest) == ["etc", "etc/b"]
    assert os.listdir(tmp_path / "cache") == ["chain"]
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o755 and os.lstat(dest).st_uid == 0
    # another unpack of the same content finds it published: the first copy is kept
    first = os.lstat(dest).st_ino
    unpack_image(layers, dest, LIMITS)
    assert os.lstat(dest).st_ino == first and os.listdir(tmp_path / "cache") == ["chain"]


def test_unpack_image_checks_diff_ids(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    layers = unpack_layers(tmp_path, tgz(f("a")), tgz(f("b")))
    wrong = [layers[0], (layers[1][0], TGZ, sha(b"something else"))]
    with pytest.raises(LayerRefused, match="layer 2: its DiffID is sha256:"):
        unpack_image(wrong, tmp_path / "cache" / "chain", LIMITS)
    with pytest.raises(LayerRefused, match="is not sha256:<64"):
        unpack_image([(layers[0][0], TGZ, "md5:1234")], tmp_path / "cache" / "chain", LIMITS)
    with pytest.raises(UnpackError, match="cannot read layer 1"):
        unpack_image([(tmp_path / "missing", TGZ, layers[0][2])], tmp_path / "cache" / "c",
                     LIMITS)
    assert os.listdir(tmp_path / "cache") == []


def test_unpack_image_counts_limits_over_the_image(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    layers = unpack_layers(tmp_path, *(tgz(*(f(f"{n}/{i}") for i in range(40)))
                                       for n in range(3)))
    with pytest.raises(LayerRefused, match="more than 18 entries"):
        unpack_image(layers, tmp_path / "cache" / "c", LIMITS._replace(max_entries=100))
    assert os.listdir(tmp_path / "cache") == []


# --- hostile layers (confined) --------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../escape", "/../escape"])
def test_traversal(cbox: Box, name: str) -> None:
    assert "has a '..' component" in refused(cbox, tgz(f(name, b"x")))
    assert not os.path.exists(cbox.work / "escape")


def test_absolute_names_land_in_the_tree(cbox: Box) -> None:
    target = f"{cbox.work}/outside/abs"  # the absolute path of a place the child can write
    answer = confined(cbox, tgz(f(target, b"x"), f("/etc/passwd", b"p")))
    assert answer["ok"], answer
    assert (cbox.work / "tree" / target.lstrip("/")).read_bytes() == b"x"
    assert (cbox.work / "tree/etc/passwd").read_bytes() == b"p"


@pytest.mark.parametrize("target", ["ABS", "../outside", "../../work/outside"])
def test_symlink_then_write_through_same_layer(cbox: Box, target: str) -> None:
    target = target.replace("ABS", str(cbox.work / "outside"))
    message = refused(cbox, tgz(sym("a", target), f("a/pwned", b"x")))
    assert "'a/pwned': it lies under the symbolic link 'a'" in message
    message = refused(cbox, tgz(sym("b", target), d("b/sub")))
    assert "lies under the symbolic link 'b'" in message


def test_symlink_from_a_lower_layer(cbox: Box) -> None:
    lower = tgz(sym("a", str(cbox.work / "outside")), d("d"), sym("d/up", "../../outside"))
    assert "under the symbolic link 'a'" in refused(cbox, lower, tgz(f("a/pwned", b"x")))
    assert "under the symbolic link 'd/up'" in refused(cbox, lower,
                                                       tgz(f("d/up/keep", b"x")))
    answer = confined(cbox, lower, tgz(f("a/.wh.keep"), f("d/up/.wh..wh..opq"),
                                       f("a/.wh..wh..opq")))
    assert answer["ok"], answer  # whiteouts under links white out nothing


def test_links_replaced_by_directories(cbox: Box) -> None:
    lower = tgz(sym("a", str(cbox.work / "outside")))
    answer = confined(cbox, lower, tgz(d("a"), f("a/keep", b"new")))
    assert answer["ok"], answer
    assert (cbox.work / "tree/a/keep").read_bytes() == b"new"


@pytest.mark.parametrize(("link", "problem"), [
    ("../outside/keep", "has a '..' component"),
    ("ABS/outside/keep", "which is not in the tree (yet)"),
    ("later", "which is not in the tree (yet)"),
    ("s/keep", "which is not in the tree (yet)"),
    ("dir", "a hard link to the directory 'dir'"),
    ("h", "a hard link to itself"),
    ("", "a hard link to the root directory"),
])
def test_hostile_hardlinks(cbox: Box, link: str, problem: str) -> None:
    link = link.replace("ABS", str(cbox.work))
    layer = tgz(d("dir"), sym("s", str(cbox.work / "outside")), hard("h", link), f("later"))
    assert problem in refused(cbox, layer)


def test_hardlink_to_a_symlink_links_the_link(cbox: Box) -> None:
    answer = confined(cbox, tgz(sym("s", str(cbox.work / "outside/keep")), hard("h", "s")))
    assert answer["ok"], answer
    assert os.readlink(cbox.work / "tree/h") == str(cbox.work / "outside/keep")


def test_devices_and_fifos_skipped(cbox: Box) -> None:
    layer = tgz(member("null", tarfile.CHRTYPE, mode=0o666), member("sda", tarfile.BLKTYPE),
                member("fifo", tarfile.FIFOTYPE), f("plain"))
    answer = confined(cbox, layer)
    assert answer["ok"] and answer["result"][0]["skipped"] == 3, answer
    assert names(cbox.work / "tree") == ["plain"]


def test_setuid_setgid_sticky_stripped(cbox: Box) -> None:
    layer = tgz(f("suid", b"x", 0o4755), f("sgid", b"x", 0o2711), d("tmp", 0o1777),
                d("sgid-dir", 0o2775))
    answer = confined(cbox, layer)
    assert answer["ok"] and answer["result"][0]["stripped"] == 4, answer
    modes = {n: stat.S_IMODE(os.lstat(cbox.work / "tree" / n).st_mode) for n in
             ("suid", "sgid", "tmp", "sgid-dir")}
    assert modes == {"suid": 0o755, "sgid": 0o711, "tmp": 0o777, "sgid-dir": 0o775}


def gzip_bomb(size: int) -> bytes:
    """A layer holding one file of ``size`` zero bytes, gzip'd (about 1,000 times smaller)."""
    header = member("bomb", claim=size)[0].tobuf(tarfile.PAX_FORMAT)
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [z.compress(header)]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        out.append(z.compress(zeros))
    out.append(z.compress(bytes(1024)))
    return b"".join(out) + z.flush()


def test_gzip_bomb_stops_early(cbox: Box) -> None:
    bomb = gzip_bomb(40 << 20)
    assert len(bomb) < 100_000
    assert "inflates more than 50 times" in refused(cbox, bomb)
    assert os.lstat(cbox.work / "tree/bomb").st_size < 8 << 20


def test_stream_larger_than_the_limit(cbox: Box) -> None:
    layer = tgz(*(f(f"f{i}", os.urandom(100_000)) for i in range(5)))
    message = refused(cbox, layer, limits=LIMITS._replace(max_bytes=300_000))
    assert "takes the layer past 300000 bytes" in message or "larger than" in message


def test_entry_count_bomb(cbox: Box) -> None:
    layer = tgz(*(f(f"e{i}") for i in range(1200)))
    assert "more than 1000 entries" in refused(cbox, layer)
    assert len(os.listdir(cbox.work / "tree")) == 1000


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_huge_declared_size(cbox: Box, fmt: int) -> None:
    layer = tgz(f("huge", claim=1 << 40), fmt=fmt)
    assert "declared size of 1099511627776 bytes is over the limit" in refused(cbox, layer)
    layer = tgz(f("big", claim=40 << 20), fmt=fmt)  # under max_file, but no data follows
    assert "truncated" in refused(cbox, layer)


def test_huge_extension_header(cbox: Box) -> None:
    layer = tgz(f("x" * 2000, b"x"), fmt=tarfile.GNU_FORMAT)
    assert "longer than 1000 bytes" in refused(cbox, layer,
                                               limits=LIMITS._replace(max_name=1000))
    raw = bytearray(tar(f("p", b"x", comment="c" * (2 << 20))))
    assert "a pax header of" in refused(cbox, bytes(raw), media_type=TAR)


@pytest.mark.parametrize(("layer", "shown"), [
    (tgz(f("p", path="a\0b")), "a\\x00b"),
    (tgz(f("a\0" + "b" * 200), fmt=tarfile.GNU_FORMAT), "a"),
    (tgz(f("evil\x1b[31m\nname")), "evil\\x1b[31m\\nname"),
    (tgz(member("s", tarfile.SYMTYPE, link="t", linkpath="t\0x")), "s"),
])
def test_nul_and_control_characters(cbox: Box, layer: bytes, shown: str) -> None:
    message = refused(cbox, layer)
    assert f"entry '{shown}'" in message, message
    assert "NUL" in message or "control character" in message


@pytest.mark.parametrize(("name", "problem"), [
    (".wh...", "a whiteout of '..'"),
    ("d/.wh...", "a whiteout of '..'"),
    ("d/.wh..", "a whiteout of '.'"),
    (".wh.", "a whiteout of ''"),
    ("../.wh.outside", "has a '..' component"),
    ("d/../../.wh.outside", "has a '..' component"),
])
def test_hostile_whiteouts(cbox: Box, name: str, problem: str) -> None:
    assert problem in refused(cbox, tgz(d("d"), f("d/x")), tgz(f(name)))
    assert names(cbox.work / "tree") == ["d", "d/x"]


def test_file_replaces_directory_and_back(cbox: Box) -> None:
    lower = tgz(d("dir"), d("dir/sub"), f("dir/sub/x"), f("file", b"f"), sym("link", "dir"))
    upper = tgz(f("dir", b"now a file"), d("file"), f("file/y", b"y"), f("link", b"l"),
                d("again"), f("again", b"a"), f("twice"), d("twice"), f("twice/z"))
    answer = confined(cbox, lower, upper)
    assert answer["ok"], answer
    tree = cbox.work / "tree"
    assert (tree / "dir").read_bytes() == b"now a file"
    assert (tree / "file/y").read_bytes() == b"y"
    assert (tree / "link").read_bytes() == b"l" and not (tree / "link").is_symlink()
    assert (tree / "again").read_bytes() == b"a"
    assert names(tree / "twice") == ["z"]


def test_entry_under_a_file(cbox: Box) -> None:
    message = refused(cbox, tgz(f("file", b"f")), tgz(f("file/x", b"x")))
    assert "'file/x': it lies under the non-directory 'file'" in message


def test_implied_directories_count_as_entries(cbox: Box) -> None:
    deep = "/".join(["d"] * 50)
    message = refused(cbox, tgz(f(deep)), limits=LIMITS._replace(max_entries=20))
    assert "more than 20 entries (with the directories that entries imply)" in message
    message = refused(cbox, tgz(f("x/" * 300 + "y")))
    assert "nests more than 256 directories" in message


def test_unpack_image_removes_a_refused_tree(cbox: Box) -> None:
    cache = cbox.work / "tree"
    good = tgz(d("etc"), f("etc/a"))
    bad = tgz(sym("a", str(cbox.work / "outside")), f("a/pwned"))
    paths = []
    for i, data in enumerate((good, bad)):
        path = cbox.root / f"l{i}"
        path.write_bytes(data)
        paths.append([str(path), TGZ, sha(gzip.decompress(data))])
    answer = run_confined(cbox, UNPACK, layers=paths, dest=str(cache / "chain"),
                          limits=LIMITS._asdict())
    assert not answer["ok"] and answer["error"] == "LayerRefused", answer
    assert "layer entry 'a/pwned': it lies under the symbolic link 'a'" in answer["message"]
    assert os.listdir(cache) == [] and names(cbox.work / "outside") == ["keep"]
    answer = run_confined(cbox, UNPACK, layers=paths[:1], dest=str(cache / "chain"),
                          limits=LIMITS._asdict())
    assert answer["ok"], answer
    assert os.listdir(cache) == ["chain"] and names(cache / "chain") == ["etc", "etc/a"]
