"""The CycloneDX SBOM of an image: valid against CycloneDX's JSON schema (the library's strict
validator), the same bytes for the same image, package URLs as Debian's tools write them, and
stored in the cache (0600, removed with the image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from stockade.image.cache import CachedImage
from stockade.image.packages import Distribution, ImageContents, Package, read_contents
from stockade.image.sbom import make_sbom, sbom_tag, stored_sbom

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def _image(tree: Path, digest: str = DIGEST) -> CachedImage:
    return CachedImage(digest, f"registry.example:5000/team/base@{digest}", "sha256:" + "0" * 64,
                       tree, {}, 0, 0.0)


def _host_tree(tmp: Path) -> Path:
    tree = tmp / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "var/lib/dpkg/status").write_bytes(Path("/var/lib/dpkg/status").read_bytes())
    (tree / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n'
                                         'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    return tree


def _valid(sbom: bytes) -> None:
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom.decode(),
                                                                   all_errors=True)
    assert errors is None, [str(e) for e in errors or ()][:5]


def test_the_sbom_of_a_debian_image_is_schema_valid_and_deterministic(tmp_path: Path) -> None:
    tree = _host_tree(tmp_path)
    image = _image(tree)
    sbom = make_sbom(image, read_contents(tree))
    _valid(sbom)
    assert make_sbom(image, read_contents(tree)) == sbom  # the same image, the same bytes
    doc = json.loads(sbom)
    assert doc["specVersion"] == "1.6" and "timestamp" not in doc["metadata"]
    root = doc["metadata"]["component"]
    assert root["type"] == "container" and root["version"] == DIGEST
    assert root["name"] == "registry.example:5000/team/base"
    assert root["purl"] == f"pkg:oci/base@{DIGEST}?repository_url=" \
                           "registry.example:5000/team/base"
    libraries = [c for c in doc["components"] if c["type"] == "library"]
    assert len(libraries) == len(read_contents(tree).packages)
    assert {"type": "operating-system", "name": "debian", "version": "12"}.items() <= \
        next(c for c in doc["components"] if c["type"] == "operating-system").items()
    empty = ImageContents((), Distribution())
    assert json.loads(make_sbom(_image(tree, OTHER), empty))["serialNumber"] != \
        doc["serialNumber"] == json.loads(make_sbom(image, empty))["serialNumber"]


def test_package_urls_name_the_source_and_the_distribution(tmp_path: Path) -> None:
    contents = ImageContents((
        Package("bash", "5.2.15-2+b2", "amd64", "bash", "5.2.15-2"),
        Package("libc6", "2.36-9+deb12u4", "amd64", "glibc", "2.36-9+deb12u4"),
        Package("zlib1g", "1:1.2.13.dfsg-1", "amd64", "zlib1g", "1:1.2.13.dfsg-1"),
    ), Distribution("debian", "12", "bookworm"))
    sbom = make_sbom(_image(tmp_path), contents)
    _valid(sbom)
    purls = {c["name"]: c["purl"] for c in json.loads(sbom)["components"] if "purl" in c}
    assert purls["bash"] == ("pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64&distro=debian-12"
                             "&upstream=bash%405.2.15-2")
    assert purls["libc6"] == ("pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64"
                              "&distro=debian-12&upstream=glibc")
    assert purls["zlib1g"] == "pkg:deb/debian/zlib1g@1:1.2.13.dfsg-1?arch=amd64&distro=debian-12"


def test_an_image_without_packages_has_a_valid_empty_sbom(tmp_path: Path) -> None:
    sbom = make_sbom(_image(tmp_path), ImageContents((), Distribution()))
    _valid(sbom)
    assert json.loads(sbom).get("components", []) == []


def test_the_sbom_is_stored_with_the_cache_and_goes_with_its_image(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_text("Package: a\nStatus: install ok installed\n"
                                              "Version: 1.0-1\nArchitecture: all\n")
    cache = tmp_path / "images"
    (cache / "images").mkdir(parents=True)
    for digest in (DIGEST, OTHER):
        (cache / "images" / f"{digest[7:]}.json").write_text("{}")  # (the cache's records)
    first = stored_sbom(cache, _image(tree))
    stored = cache / "sbom" / f"{DIGEST[7:]}.cdx.json"
    assert stored.read_bytes() == first and stored.stat().st_mode & 0o777 == 0o600
    (tree / "var/lib/dpkg/status").unlink()
    assert stored_sbom(cache, _image(tree)) == first  # (read back, not made again)
    (cache / "images" / f"{DIGEST[7:]}.json").unlink()  # evicted
    stored_sbom(cache, _image(tree, OTHER))
    assert not stored.exists()
    assert sbom_tag(DIGEST) == f"sha256-{DIGEST[7:]}.sbom"
    with pytest.raises(ValueError):
        sbom_tag("sha256:../../x")


def test_an_sbom_has_a_bounded_number_of_packages(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade.image import sbom
    from stockade.image.packages import UnreadablePackages

    monkeypatch.setattr(sbom, "MAX_SBOM_PACKAGES", 2)
    contents = ImageContents(tuple(Package(f"p{n}", "1.0", "all", f"p{n}", "1.0")
                                   for n in range(3)), Distribution())
    with pytest.raises(UnreadablePackages, match="at most 2"):
        make_sbom(_image(tmp_path), contents)
