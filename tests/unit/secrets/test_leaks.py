"""Leak scanning: values are found inside archives, and what cannot be scanned is said so."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from stockade.secrets.leaks import ScanLimits, ScanResult, scan_file
from stockade.secrets.redact import Masker

SECRET = b"leak-scan-secret-" + os.urandom(6).hex().encode()


@pytest.fixture
def masker() -> Masker:
    m = Masker()
    m.add(SECRET, name="TOKEN")
    return m


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED,
              prefix: bytes = b"") -> bytes:
    buf = io.BytesIO()
    buf.write(prefix)
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def text_with_secret() -> bytes:
    # compressible around the secret, so that it is not in the compressed bytes as they are
    return b"log line\n" * 2000 + b"token=" + SECRET + b"\n" + b"more lines\n" * 2000


def scan(tmp_path: Path, data: bytes, masker: Masker, **limits: int | float) -> ScanResult:
    path = tmp_path / "artifact"
    path.write_bytes(data)
    return scan_file(path, masker, ScanLimits(**limits))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["plain", "gzip", "bzip2", "xz", "tar", "tar.gz", "tar.bz2",
                                  "tar.xz", "zip", "zip-bzip2", "zip-lzma", "zip-stored",
                                  "nested tar in zip", "gzip of gzip", "tar.gz in zip",
                                  "zip with a prefix"])
def test_a_secret_inside_an_archive_is_found(tmp_path: Path, masker: Masker, kind: str) -> None:
    inner = text_with_secret()
    data = {
        "plain": lambda: inner,
        "gzip": lambda: gzip.compress(inner),
        "bzip2": lambda: bz2.compress(inner),
        "xz": lambda: lzma.compress(inner),
        "tar": lambda: tar_bytes({"dir/a.txt": b"x", "dir/log.txt": inner}),
        "tar.gz": lambda: tar_bytes({"dir/log.txt": inner}, "w:gz"),
        "tar.bz2": lambda: tar_bytes({"dir/log.txt": inner}, "w:bz2"),
        "tar.xz": lambda: tar_bytes({"dir/log.txt": inner}, "w:xz"),
        "zip": lambda: zip_bytes({"a.txt": b"x", "log.txt": inner}),
        "zip-bzip2": lambda: zip_bytes({"log.txt": inner}, zipfile.ZIP_BZIP2),
        "zip-lzma": lambda: zip_bytes({"log.txt": inner}, zipfile.ZIP_LZMA),
        "zip-stored": lambda: zip_bytes({"log.gz": gzip.compress(inner)}, zipfile.ZIP_STORED),
        "nested tar in zip": lambda: zip_bytes({"inner.tar": tar_bytes({"log.txt": inner})}),
        "gzip of gzip": lambda: gzip.compress(gzip.compress(inner)),
        "tar.gz in zip": lambda: zip_bytes({"a.tgz": tar_bytes({"l": inner}, "w:gz")}),
        "zip with a prefix": lambda: zip_bytes({"log.txt": inner}, prefix=b"#!/usr/bin/env x\n"),
    }[kind]()
    if kind not in ("plain", "tar"):  # only the scan of what the archive holds can find it
        assert SECRET not in data
    assert scan(tmp_path, data, masker) == ScanResult({"TOKEN"}, None)


def test_a_secret_in_a_member_name_or_a_gzip_header_is_found(tmp_path: Path,
                                                             masker: Masker) -> None:
    named = tar_bytes({"dir/" + SECRET.decode() + ".txt": b"x"}, "w:gz")
    assert scan(tmp_path, named, masker).found == {"TOKEN"}
    buf = io.BytesIO()
    with gzip.GzipFile(SECRET.decode(), "wb", fileobj=buf) as f:
        f.write(b"nothing here")
    assert scan(tmp_path, buf.getvalue(), masker).found == {"TOKEN"}


def test_clean_archives_are_clean(tmp_path: Path, masker: Masker) -> None:
    for data in (tar_bytes({"a": b"hello" * 1000}, "w:gz"), zip_bytes({"a": b"x" * 10_000}),
                 gzip.compress(os.urandom(100_000)), b""):
        result = scan(tmp_path, data, masker)
        assert result == ScanResult() and result.clean


def test_without_secrets_nothing_is_read(tmp_path: Path) -> None:
    assert scan(tmp_path, b"\x1f\x8b\x08 not really gzip", Masker()) == ScanResult()


def gzip_bomb(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    return b"".join([*(compressor.compress(zeros) for _ in range(size >> 20)),
                     compressor.flush()])


def test_a_gzip_bomb_is_unscannable_quickly(tmp_path: Path, masker: Masker) -> None:
    bomb = gzip_bomb(256 << 20)  # 256 MiB from ~250 kB: past the 64 MiB floor
    started = time.perf_counter()
    result = scan(tmp_path, bomb, masker)
    assert result.unscannable is not None and "bomb" in result.unscannable
    assert time.perf_counter() - started < 20
    assert "bomb" in (scan(tmp_path, gzip_bomb(8 << 20), masker, floor=1 << 20).unscannable
                      or "")


def test_a_zip_bomb_is_unscannable_quickly(tmp_path: Path, masker: Masker) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("a", "b"):
            with archive.open(name, "w", force_zip64=True) as f:
                for _ in range(64):
                    f.write(bytes(1024 * 1024))
    started = time.perf_counter()
    result = scan(tmp_path, buf.getvalue(), masker)
    assert result.unscannable is not None and "bomb" in result.unscannable
    assert time.perf_counter() - started < 20


def encrypted(zipped: bytes) -> bytes:
    """The archive with every entry marked encrypted (what ``zip -e`` sets)."""
    data = bytearray(zipped)
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at >= 0:
            (flags,) = struct.unpack_from("<H", data, at + flags_at)
            struct.pack_into("<H", data, at + flags_at, flags | 1)
            at = data.find(signature, at + 4)
    return bytes(data)


def test_an_encrypted_zip_is_unscannable(tmp_path: Path, masker: Masker) -> None:
    result = scan(tmp_path, encrypted(zip_bytes({"a.txt": b"opaque"})), masker)
    assert result.unscannable is not None and "encrypted" in result.unscannable
    inside = zip_bytes({"enc.zip": encrypted(zip_bytes({"a.txt": b"opaque"}))})
    assert "encrypted" in (scan(tmp_path, inside, masker).unscannable or "")


@pytest.mark.parametrize("data, why", [
    (b"".join([gzip.compress(b"x")] * 1), None),
    (gzip.compress(gzip.compress(gzip.compress(gzip.compress(b"four layers")))), None),
    (gzip.compress(gzip.compress(gzip.compress(gzip.compress(gzip.compress(b"5"))))),
     "nested"),
    (gzip.compress(os.urandom(5000))[:2000], "truncated"),
    (b"\x1f\x8b\x08\x00" + os.urandom(200), "corrupt"),
    (b"\x28\xb5\x2f\xfd" + os.urandom(100), "zstd"),
    (b"PK\x03\x04" + os.urandom(300), "corrupt zip"),
], ids=["one-member", "four-layers", "five-layers", "truncated", "corrupt", "zstd",
        "corrupt-zip"])  # (the data holds gzip's clock: xdist workers must name them alike)
def test_what_cannot_be_scanned_is_said(tmp_path: Path, masker: Masker, data: bytes,
                                        why: str | None) -> None:
    result = scan(tmp_path, data, masker)
    if why is None:
        assert result.unscannable is None
    else:
        assert result.unscannable is not None and why in result.unscannable


def test_the_reason_never_quotes_the_file(tmp_path: Path, masker: Masker) -> None:
    data = encrypted(zip_bytes({SECRET.decode(): b"x"}))
    result = scan(tmp_path, data, masker)
    assert result.unscannable is not None and SECRET.decode() not in result.unscannable
    assert result.found == {"TOKEN"}  # the name is in the central directory as it is


def test_entries_time_and_header_sizes_are_bounded(tmp_path: Path, masker: Masker) -> None:
    many = zip_bytes({f"f{i}": b"" for i in range(300)})
    assert "entries" in (scan(tmp_path, many, masker, max_entries=100).unscannable or "")
    assert scan(tmp_path, many, masker).unscannable is None
    slow = scan(tmp_path, gzip.compress(b"x" * 100), masker, max_seconds=0.0)
    assert "longer than" in (slow.unscannable or "")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("x")
        info.pax_headers = {"comment": "A" * (4 << 20)}  # tarfile reads a header whole
        archive.addfile(info, io.BytesIO(b""))
    header = scan(tmp_path, gzip.compress(buf.getvalue()), masker)
    assert "header" in (header.unscannable or "")


def test_links_and_special_files_are_unscannable(tmp_path: Path, masker: Masker) -> None:
    target = tmp_path / "target"
    target.write_bytes(SECRET)
    (tmp_path / "link").symlink_to(target)
    assert scan_file(tmp_path / "link", masker).unscannable is not None
    os.mkfifo(tmp_path / "fifo")
    assert scan_file(tmp_path / "fifo", masker).unscannable == "not a regular file"
    assert scan_file(target, masker).found == {"TOKEN"}


def test_the_budget_follows_the_file_size() -> None:
    limits = ScanLimits()
    assert limits.budget(0) == 64 << 20
    assert limits.budget(10 << 20) == 320 << 20
    assert limits.budget(1 << 40) == 1 << 30
