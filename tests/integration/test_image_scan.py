"""SBOMs and vulnerability scans of an image with a dpkg database (a static busybox, pushed to
a real registry on loopback): ``stockade image sbom --attach`` and the SBOM read back from the
registry, ``stockade image scan`` against OSV records, and jobs refused (image_vulnerable)
before any step, or run with their image's counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from stockade.image.reference import parse_reference
from stockade.image.registry import Registry, RegistryConfig
from tests.conftest import run_cli
from tests.support.images import busybox_image
from tests.support.osv import CRITICAL, HIGH, record, write_dir
from tests.support.registry import RunningRegistry

STATUS = b"""\
Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc
Version: 2.36-9+deb12u3

Package: bash
Status: install ok installed
Architecture: amd64
Source: bash (5.2.15-2)
Version: 5.2.15-2+b2

Package: removed
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
"""


@pytest.fixture
def scanned(plain_registry: RunningRegistry, tmp_path: Path) -> dict[str, Any]:
    """The image at HOST/test/scanned:1, and OSV data with and without a critical finding."""
    image = busybox_image(tmp_path, extra={
        "etc/os-release": b'ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n',
        "var/lib/dpkg/status": STATUS})
    client = Registry(RegistryConfig(insecure=frozenset({plain_registry.host})))
    image.push(client, f"{plain_registry.host}/test/scanned:1")
    client.close()
    high = record("CVE-2099-0002", "bash", "5.2.15-2+deb12u1", vector=HIGH)
    return {"host": plain_registry.host, "digest": image.digest,
            "critical": write_dir(tmp_path / "critical", [
                record("CVE-2099-0001", "glibc", "2.36-9+deb12u4", vector=CRITICAL), high,
                record("CVE-2099-0003", "glibc", "2.36-9+deb12u2", vector=CRITICAL),
                record("CVE-2099-0004", "glibc", None, ecosystem="Debian:11")]),
            "benign": write_dir(tmp_path / "benign", [high]),
            "env": {"STOCKADE_IMAGE_REGISTRIES": plain_registry.host,
                    "STOCKADE_INSECURE_REGISTRIES": plain_registry.host}}


def test_the_sbom_is_attached_and_read_back(stockade_home: Path, scanned: dict[str, Any],
                                            tmp_path: Path) -> None:
    host, digest = scanned["host"], scanned["digest"]
    out = tmp_path / "sbom.json"
    made = run_cli(stockade_home, "image", "sbom", f"{host}/test/scanned:1", "--attach",
                   "--output", str(out), **scanned["env"])
    assert made.returncode == 0, made.stderr
    tag = f"sha256-{digest[7:]}.sbom"
    assert f"attached: {host}/test/scanned:{tag}" in made.stderr
    sbom = out.read_bytes()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom.decode()) is None
    doc = json.loads(sbom)
    assert doc["metadata"]["component"]["version"] == digest
    assert sorted(c["name"] for c in doc["components"] if c["type"] == "library") == [
        "bash", "libc6"]
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    try:
        ref = parse_reference(f"{host}/test/scanned:{tag}")
        manifest = client.manifest(ref.with_digest(client.resolve(ref)))
        assert [layer.media_type for layer in manifest.layers] == ["application/vnd.cyclonedx+json"]
        fetched = tmp_path / "fetched.json"
        with fetched.open("w+b") as f:
            client.blob(ref, manifest.layers[0], f)
    finally:
        client.close()
    assert fetched.read_bytes() == sbom
    again = run_cli(stockade_home, "image", "sbom", f"{host}/test/scanned@{digest}")
    assert again.returncode == 0 and again.stdout.encode() == sbom  # (cached, the same bytes)


def test_image_scan(stockade_home: Path, scanned: dict[str, Any]) -> None:
    host = scanned["host"]
    ref = f"{host}/test/scanned:1"
    found = run_cli(stockade_home, "image", "scan", ref, "--vulns", str(scanned["critical"]),
                    "--json", **scanned["env"])
    assert found.returncode == 1, found.stderr  # a critical finding, at the default threshold
    doc = json.loads(found.stdout)
    assert doc["counts"] == {"critical": 1, "high": 1, "medium": 0, "low": 0, "unknown": 0}
    first = doc["findings"][0]
    assert (first["id"], first["package"], first["binaries"], first["installed"],
            first["fixed"]) == ("DEBIAN-CVE-2099-0001", "glibc", ["libc6"], "2.36-9+deb12u3",
                                "2.36-9+deb12u4")
    assert doc["findings"][1]["installed"] == "5.2.15-2"  # (bash 5.2.15-2+b2's source)
    table = run_cli(stockade_home, "image", "scan", f"sha256:{scanned['digest'][7:]}",
                    "--vulns", str(scanned["critical"]), "--fail-on", "none")
    assert table.returncode == 0, table.stderr
    assert "DEBIAN-CVE-2099-0001" in table.stdout and "1 critical, 1 high" in table.stdout
    missing = run_cli(stockade_home, "image", "scan", ref, "--vulns", "/nonexistent/osv",
                      **scanned["env"])
    assert missing.returncode == 2 and "hint:" in missing.stderr
    assert "Traceback" not in found.stderr + table.stderr + missing.stderr


def test_a_job_on_a_vulnerable_image_is_refused_before_any_step(
        run_job, scanned: dict[str, Any]) -> None:
    spec = (f"name: scanned\nimage: {scanned['host']}/test/scanned:1\nsteps:\n"
            "  - name: probe\n    run: echo STEP-RAN\n")
    env = {**scanned["env"], "STOCKADE_VULNERABILITY_DATA": str(scanned["critical"])}
    refused = run_job(spec, **env)
    assert refused.rc == 1, refused.stderr
    result = refused.result
    assert (result["status"], result["failure_reason"]) == ("failed", "image_vulnerable")
    assert result["steps"] == [] and "STEP-RAN" not in refused.log
    assert result["image_vulnerabilities"]["critical"] == 1
    assert "DEBIAN-CVE-2099-0001 (glibc)" in result["error"]
    env["STOCKADE_VULNERABILITY_DATA"] = str(scanned["benign"])
    runs = run_job(spec, **env)
    assert runs.rc == 0, runs.stderr + runs.log
    assert runs.result["image_vulnerabilities"] == {"critical": 0, "high": 1, "medium": 0,
                                                   "low": 0, "unknown": 0}
    assert "STEP-RAN" in runs.log and "image vulnerabilities: 0 critical, 1 high" in runs.log
    again = run_job(spec, **env)
    assert again.rc == 0 and "(scan cached)" in again.log
