"""OSV advisories against an image's packages: ranges (introduced, fixed, last_affected,
limit) in dpkg's order, explicit versions, source packages and binNMUs, ecosystems, severity;
and the data treated as hostile (garbage, deep nesting, huge files, zip bombs)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from stockade.errors import ConfigError
from stockade.image import osv
from stockade.image.osv import VulnerabilityDataError, load
from stockade.image.packages import Distribution, ImageContents, Package
from stockade.image.vulns import Severity, cvss_score, scan
from tests.support.osv import CRITICAL, HIGH, LOW, MEDIUM, record, write_dir, write_zip

DEBIAN_12 = Distribution("debian", "12", "bookworm")


def _image(*packages: tuple[str, str, str, str], dist: Distribution = DEBIAN_12
           ) -> ImageContents:
    """``(name, version, source, source version)`` packages on amd64."""
    return ImageContents(tuple(Package(n, v, "amd64", s, sv) for n, v, s, sv in packages), dist)


GLIBC = ("libc6", "2.36-9+deb12u3", "glibc", "2.36-9+deb12u3")


def _scan(tmp: Path, records: list[dict[str, Any]], image: ImageContents | None = None
          ) -> dict[str, Any]:
    report = scan(image or _image(GLIBC), load(str(write_dir(tmp / "osv", records))))
    return {f.id: f for f in report.findings} | {"counts": report.counts,
                                                 "malformed": report.malformed}


def test_fixed_ranges_in_dpkg_order(tmp_path: Path) -> None:
    found = _scan(tmp_path, [
        record("CVE-2023-0001", "glibc", "2.36-9+deb12u4", vector=CRITICAL),  # affected
        record("CVE-2023-0002", "glibc", "2.36-9+deb12u3"),  # fixed in exactly ours
        record("CVE-2023-0003", "glibc", "2.36-9+deb12u10"),  # u10 > u3 (numbers)
        record("CVE-2023-0004", "glibc", "2.36-9"),  # fixed below ours
        record("CVE-2023-0005", "glibc", None),  # not fixed yet
        record("CVE-2023-0006", "glibc", "2.37-1", introduced="2.37~rc1"),  # after ours
        record("CVE-2023-0007", "glibc", "1:2.0-1"),  # an epoch beats everything
        record("CVE-2023-0008", "libc6", "9.9"),  # a binary name: advisories name sources
    ])
    assert set(found) - {"counts", "malformed"} == {
        "DEBIAN-CVE-2023-0001", "DEBIAN-CVE-2023-0003", "DEBIAN-CVE-2023-0005",
        "DEBIAN-CVE-2023-0007"}
    hit = found["DEBIAN-CVE-2023-0001"]
    assert (hit.package, hit.binaries, hit.installed, hit.fixed, hit.severity) == (
        "glibc", ("libc6",), "2.36-9+deb12u3", "2.36-9+deb12u4", Severity.CRITICAL)
    assert hit.aliases == ("CVE-2023-0001",)
    assert found["DEBIAN-CVE-2023-0005"].fixed is None
    assert found["counts"]["critical"] == 1 and sum(found["counts"].values()) == 4


def _events(*events: tuple[str, str]) -> dict[str, Any]:
    return {"type": "ECOSYSTEM", "events": [{k: v} for k, v in events]}


@pytest.mark.parametrize(("events", "installed", "affected", "fixed"), [
    ([("introduced", "0"), ("last_affected", "1.0-1")], "1.0-1", True, None),
    ([("introduced", "0"), ("last_affected", "1.0-1")], "1.0-1+b1", False, None),
    ([("introduced", "1.0~rc1"), ("fixed", "1.0")], "1.0~rc2", True, "1.0"),
    ([("introduced", "1.0~rc1"), ("fixed", "1.0")], "1.0~beta1", False, None),
    ([("fixed", "2.0"), ("introduced", "1.0"), ("fixed", "1.5"), ("introduced", "1.8")],
     "1.6", False, None),  # (events in any order: sorted by version)
    ([("fixed", "2.0"), ("introduced", "1.0"), ("fixed", "1.5"), ("introduced", "1.8")],
     "1.9", True, "2.0"),
    ([("introduced", "0"), ("limit", "3.0")], "3.0", False, None),
    ([("introduced", "0")], "0~0", True, None),
])
def test_range_events(tmp_path: Path, events: list[tuple[str, str]], installed: str,
                      affected: bool, fixed: str | None) -> None:
    doc = record("CVE-2024-1", "pkg")
    doc["affected"][0]["ranges"] = [_events(*events)]
    found = _scan(tmp_path, [doc], _image(("pkg", installed, "pkg", installed)))
    assert ("DEBIAN-CVE-2024-1" in found) is affected
    if affected:
        assert found["DEBIAN-CVE-2024-1"].fixed == fixed


def test_binnmus_match_by_their_source_version(tmp_path: Path) -> None:
    image = _image(("bash", "5.2.15-2+b2", "bash", "5.2.15-2"),
                   ("bsdutils", "1:2.38.1-5", "util-linux", "2.38.1-5"),
                   ("libmount1", "2.38.1-5", "util-linux", "2.38.1-5"))
    found = _scan(tmp_path, [record("CVE-2022-1", "bash", "5.2.15-2"),  # the binNMU is fixed
                             record("CVE-2022-2", "bash", "5.2.15-2+deb12u1"),
                             record("CVE-2022-3", "util-linux", "2.38.1-5+deb12u1")], image)
    assert "DEBIAN-CVE-2022-1" not in found and "DEBIAN-CVE-2022-2" in found
    assert found["DEBIAN-CVE-2022-3"].binaries == ("bsdutils", "libmount1")


def test_explicit_versions_and_other_ecosystems(tmp_path: Path) -> None:
    listed = record("CVE-2021-1", "glibc", None)
    listed["affected"][0]["ranges"] = []
    listed["affected"][0]["versions"] = ["2.36-9+deb12u3", "2.36-8"]
    unlisted = record("CVE-2021-2", "glibc", None)
    unlisted["affected"][0]["ranges"] = []
    unlisted["affected"][0]["versions"] = ["2.36-9+deb12u2"]
    any_debian = record("CVE-2021-3", "glibc", "2.37-1", ecosystem="Debian")
    found = _scan(tmp_path, [
        listed, unlisted, any_debian,
        record("CVE-2021-4", "glibc", "9.0", ecosystem="Debian:11"),
        record("CVE-2021-5", "glibc", "9.0", ecosystem="Ubuntu:22.04:LTS"),
        record("CVE-2021-6", "glibc", "9.0", ecosystem="PyPI"),
        record("CVE-2021-7", "glibc", "9.0", withdrawn="2024-01-01T00:00:00Z"),
    ])
    assert set(found) - {"counts", "malformed"} == {"DEBIAN-CVE-2021-1", "DEBIAN-CVE-2021-3"}
    data = load(str(tmp_path / "osv"))
    assert (data.records, data.ignored, data.malformed) == (7, 3, 0)  # (Debian:11 is kept)
    assert scan(_image(GLIBC, dist=Distribution("ubuntu", "22.04")), data).findings == ()


def test_a_dsa_naming_cves_published_one_by_one_is_folded(tmp_path: Path) -> None:
    dsa = {"id": "DSA-5514-1", "aliases": ["CVE-2023-4911", "CVE-2023-4527"],
           "affected": [{"package": {"name": "glibc", "ecosystem": "Debian:12"},
                         "ranges": [_events(("introduced", "0"),
                                            ("fixed", "2.36-9+deb12u4"))]}]}
    found = _scan(tmp_path, [dsa, record("CVE-2023-4911", "glibc", "2.36-9+deb12u4",
                                         vector=HIGH),
                             record("CVE-2023-4527", "glibc", "2.36-9+deb12u4")])
    assert set(found) - {"counts", "malformed"} == {"DEBIAN-CVE-2023-4911",
                                                     "DEBIAN-CVE-2023-4527"}
    assert "DSA-5514-1" in found["DEBIAN-CVE-2023-4911"].aliases
    alone = _scan(tmp_path / "alone", [dsa])
    assert "DSA-5514-1" in alone


@pytest.mark.parametrize(("fields", "expected"), [
    ({"vector": CRITICAL}, Severity.CRITICAL),
    ({"vector": HIGH, "urgency": "low"}, Severity.HIGH),
    ({"vector": MEDIUM}, Severity.MEDIUM),
    ({"vector": LOW}, Severity.LOW),
    ({"vector": CRITICAL, "urgency": "unimportant"}, Severity.LOW),
    ({"urgency": "high"}, Severity.HIGH),
    ({"urgency": "medium**"}, Severity.MEDIUM),
    ({"urgency": "not yet assigned"}, Severity.UNKNOWN),
    ({"vector": "CVSS:3.1/AV:X/garbage"}, Severity.UNKNOWN),
    ({"database_specific": {"severity": "MODERATE"}}, Severity.MEDIUM),
    ({"severity": [{"type": "CVSS_V4", "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/"
                    "VA:H/SC:N/SI:N/SA:N"}]}, Severity.CRITICAL),
    ({"severity": [{"type": "CVSS_V2", "score": "AV:N/AC:L/Au:N/C:P/I:P/A:P"}]},
     Severity.HIGH),
])
def test_severity(tmp_path: Path, fields: dict[str, Any], expected: Severity) -> None:
    found = _scan(tmp_path, [record("CVE-2020-1", "glibc", None, **fields)])
    assert found["DEBIAN-CVE-2020-1"].severity is expected
    assert found["counts"][expected.value] == 1


def test_cvss_scores() -> None:
    assert cvss_score(CRITICAL) == (3, 9.8)
    assert cvss_score("CVSS:3.1/" + "X" * 300) is None
    assert cvss_score("nonsense") is None


def test_a_directory_a_zip_and_a_single_file_load_alike(tmp_path: Path) -> None:
    records = [record(f"CVE-2019-{n}", "glibc", "2.36-9+deb12u9") for n in range(5)]
    single = tmp_path / "all.json"
    single.write_text(json.dumps(records))
    loaded = [load(str(p)) for p in (write_dir(tmp_path / "dir", records),
                                     write_zip(tmp_path / "all.zip", records), single)]
    assert [d.records for d in loaded] == [5, 5, 5]
    assert loaded[0].advisories == loaded[1].advisories == loaded[2].advisories
    assert osv.from_json(json.loads(json.dumps(osv.to_json(loaded[0])))) == loaded[0]


def test_malformed_records_are_counted_not_matched(tmp_path: Path) -> None:
    bad_event = record("CVE-2018-1", "glibc", "2.37")
    bad_event["affected"][0]["ranges"][0]["events"].append({"fixed": 3})
    two_kinds = record("CVE-2018-2", "glibc", "2.37")
    two_kinds["affected"][0]["ranges"][0]["events"] = [{"introduced": "0", "fixed": "2.37"}]
    bad_version = record("CVE-2018-3", "glibc", "2.37 beta")  # parses as JSON, not as dpkg
    found = _scan(tmp_path, [bad_event, two_kinds, bad_version, {"id": 5}, ["not a record"],
                             {"id": "X-1", "affected": "everything"},
                             record("CVE-2018-4", "glibc", "2.37")])
    assert set(found) - {"counts", "malformed"} == {"DEBIAN-CVE-2018-4"}
    data = load(str(tmp_path / "osv"))
    assert data.malformed == 4 and data.ignored == 1
    assert found["malformed"] == 4 + 1  # and the unparsable fixed version, found matching


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[" * 100_000,
                                     b'{"id": 1' + b"9" * 5000 + b"}"])
def test_garbage_or_deeply_nested_json_stops_the_load(tmp_path: Path, content: bytes) -> None:
    write_dir(tmp_path / "osv", [record("CVE-2017-1", "glibc", None)])
    (tmp_path / "osv" / "zz-broken.json").write_bytes(content)
    with pytest.raises(VulnerabilityDataError, match=r"zz-broken\.json") as refused:
        load(str(tmp_path / "osv"))
    assert isinstance(refused.value, ConfigError) and refused.value.exit_code == 2
    assert "hint" in refused.value.diagnostics()


def test_sizes_are_bounded_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr(osv, "MAX_RECORD_BYTES", 1 << 20)
    write_dir(tmp_path / "osv", [record("CVE-2016-1", "glibc", None)])
    with (tmp_path / "osv" / "huge.json").open("wb") as f:
        f.truncate((1 << 20) + 1)
    with pytest.raises(VulnerabilityDataError, match="larger than"):
        load(str(tmp_path / "osv"))
    bomb = tmp_path / "bomb.zip"  # 1 MiB of zeros compresses to ~1 KiB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("CVE-2016-2.json", b" " * ((1 << 20) + 10))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(VulnerabilityDataError, match="larger than"):
        load(str(bomb))


def test_missing_or_unreadable_data_is_the_operators_error(tmp_path: Path) -> None:
    with pytest.raises(VulnerabilityDataError, match="No such file"):
        load(str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt.zip"
    write_zip(corrupt, [record("CVE-2015-1", "glibc", None)])
    raw = bytearray(corrupt.read_bytes())
    raw[40:60] = b"\x00" * 20  # inside the member's compressed data
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(VulnerabilityDataError):
        load(str(corrupt))


def test_the_matching_work_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.image import vulns
    from stockade.image.packages import UnreadablePackages

    monkeypatch.setattr(vulns, "MAX_EVALUATIONS", 100)
    data = load(str(write_dir(tmp_path / "osv", [record(f"CVE-2014-{n}", "linux", None)
                                                  for n in range(10)])))
    versions = [(f"linux-image-{n}", f"6.1.{n}-1", "linux", f"6.1.{n}-1") for n in range(11)]
    with pytest.raises(UnreadablePackages, match="more than the 100"):
        scan(_image(*versions), data)  # (one source at 11 versions: 110 evaluations)
    assert len(scan(_image(*versions[:10]), data).findings) == 100
