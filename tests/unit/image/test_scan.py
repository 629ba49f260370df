"""Scans stored per image and data, and the runner's policy: counts for every job, refusal at
or above image_refuse_severity, an unreadable database refused unless the policy is none."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from stockade.config import Settings
from stockade.errors import ConfigError
from stockade.image import scan as scanning
from stockade.image.cache import CachedImage
from stockade.image.scan import check_image, data_signature, scan_cached, threshold
from stockade.image.vulns import Severity
from tests.support.osv import CRITICAL, HIGH, record, write_dir, write_zip

DIGEST = "sha256:" + "ab" * 32


def _setup(tmp: Path) -> tuple[Path, CachedImage]:
    tree = tmp / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    (tree / "var/lib/dpkg/status").write_text(
        "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9+deb12u3\n"
        "Architecture: amd64\nSource: glibc\n\n"
        "Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13.dfsg-1\n"
        "Architecture: amd64\nSource: zlib\n")
    cache = tmp / "images"
    (cache / "images").mkdir(parents=True)
    (cache / "images" / f"{DIGEST[7:]}.json").write_text("{}")
    return cache, CachedImage(DIGEST, f"registry.example/team/base@{DIGEST}",
                              "sha256:" + "0" * 64, tree, {}, 0, 0.0)


def _settings(tmp: Path, data: Path, refuse: str = "critical") -> Settings:
    return Settings(home=tmp, vulnerability_data=str(data), image_refuse_severity=refuse)


def test_a_scan_is_stored_per_image_and_data(tmp_path: Path) -> None:
    cache, image = _setup(tmp_path)
    data = write_dir(tmp_path / "osv", [record("CVE-2024-1", "glibc", "2.36-9+deb12u4",
                                               vector=HIGH)])
    report, fresh = scan_cached(cache, image, str(data))
    assert fresh and report.counts["high"] == 1 and report.ecosystem == "Debian:12"
    stored = cache / "scan" / f"{DIGEST[7:]}.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    scanning._LOADED.clear()  # (another process)
    started = time.perf_counter()
    again, fresh = scan_cached(cache, image, str(data))
    assert not fresh and again == report
    assert time.perf_counter() - started < 0.5
    # new data: scanned again (a record added changes the directory's signature)
    write_dir(tmp_path / "osv2", [record("CVE-2024-2", "zlib", None, vector=CRITICAL)])
    os.replace(tmp_path / "osv2" / "000000.json", data / "000001.json")
    newer, fresh = scan_cached(cache, image, str(data))
    assert fresh and newer.counts["critical"] == 1 and newer.counts["high"] == 1
    # a torn report is made again, not trusted
    stored.write_text("{")
    assert scan_cached(cache, image, str(data))[1]


def test_the_data_is_indexed_once_for_other_processes(tmp_path: Path) -> None:
    cache, image = _setup(tmp_path)
    data = write_zip(tmp_path / "all.zip", [record("CVE-2024-3", "glibc", None)])
    scan_cached(cache, image, str(data))
    index = cache / "osv" / f"{data_signature(str(data))}.json"
    assert index.is_file()
    assert json.loads(index.read_text())["records"] == 1
    scanning._LOADED.clear()  # (another process)
    (cache / "scan" / f"{DIGEST[7:]}.json").unlink()
    # the zip overwritten in place with the same size and time: the same signature, so the
    # index is what is read (the zip is garbage now)
    st = data.stat()
    with data.open("r+b") as f:
        f.write(b"\0" * st.st_size)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    report, fresh = scan_cached(cache, image, str(data))
    assert fresh and report.findings[0].id == "DEBIAN-CVE-2024-3"


def test_the_policy_counts_and_refuses(tmp_path: Path) -> None:
    cache, image = _setup(tmp_path)
    data = write_dir(tmp_path / "osv", [record("CVE-2024-4", "glibc", None, vector=CRITICAL),
                                        record("CVE-2024-5", "zlib", None, vector=HIGH)])
    assert check_image(Settings(home=tmp_path), cache, image) is None  # no data: no scan
    verdict = check_image(_settings(tmp_path, data), cache, image)
    assert verdict is not None and verdict.counts is not None
    assert (verdict.counts["critical"], verdict.counts["high"]) == (1, 1)
    assert verdict.refusal is not None and "DEBIAN-CVE-2024-4 (glibc)" in verdict.refusal
    assert "1 critical, 1 high, 0 medium, 0 low, 0 unknown in 2 packages" in verdict.note
    lenient = check_image(_settings(tmp_path, data, "none"), cache, image)
    assert lenient is not None and lenient.refusal is None and "scan cached" in lenient.note
    assert "1 critical, 1 high, 0 medium, 0 low, 0 unknown" in lenient.note  # (read back)
    strict = check_image(_settings(tmp_path, data, "high"), cache, image)
    assert strict is not None and strict.refusal is not None and "2 finding(s)" in \
        strict.refusal


def test_an_unreadable_database_is_refused_unless_the_policy_is_none(tmp_path: Path) -> None:
    cache, image = _setup(tmp_path)
    data = write_dir(tmp_path / "osv", [record("CVE-2024-6", "glibc", None)])
    status = image.rootfs / "var/lib/dpkg/status"
    status.unlink()
    status.symlink_to("/var/lib/dpkg/status")
    verdict = check_image(_settings(tmp_path, data), cache, image)
    assert verdict is not None and verdict.counts is None
    assert verdict.refusal is not None and "cannot be scanned" in verdict.refusal
    lenient = check_image(_settings(tmp_path, data, "none"), cache, image)
    assert lenient is not None and lenient.refusal is None


def test_thresholds() -> None:
    assert threshold("critical") is Severity.CRITICAL
    assert threshold("any") is Severity.UNKNOWN
    assert threshold("none") is None
    with pytest.raises(ConfigError, match="not a severity"):
        threshold("severe")
