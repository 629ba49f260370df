"""stockade image build and push: a Debian image made by mmdebstrap from the local package
mirror, reproducibly (same inputs, same digest), pushed to a real registry and run as a job,
TLS verified with the image's own CA bundle; and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli
from tests.support.debian import Built, build
from tests.support.registry import RunningRegistry

TINY = ("--variant", "extract", "--include", "base-files,busybox-static")


def test_the_same_inputs_give_the_same_digest(tmp_path: Path) -> None:
    first = build(tmp_path / "a", "test/tiny", *TINY, "--source-date-epoch", "1700000000")
    second = build(tmp_path / "b", "test/tiny", *TINY, "--source-date-epoch", "1700000000")
    other = build(tmp_path / "c", "test/tiny", *TINY, "--source-date-epoch", "1700000001")
    assert first.returncode == second.returncode == other.returncode == 0, first.stderr
    digest = first.stdout.splitlines()[-1]
    assert digest.startswith("test/tiny@sha256:") and len(digest) == len("test/tiny@") + 71
    assert second.stdout.splitlines()[-1] == digest
    assert other.stdout.splitlines()[-1] != digest  # the epoch is an input
    layout = tmp_path / "a" / "layout"
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in index["manifests"]] == ["test/tiny"]
    assert oct((layout).stat().st_mode & 0o777) == "0o700"
    config = json.loads((layout / "blobs" / "sha256" / _config_hex(layout, digest)).read_text())
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["rootfs"]["diff_ids"][0].startswith("sha256:")


def _config_hex(layout: Path, image: str) -> str:
    manifest = json.loads((layout / "blobs" / "sha256" / image.split(":")[-1]).read_text())
    return str(manifest["config"]["digest"].split(":")[1])


def test_a_built_image_is_pushed_pulled_and_runs_a_job(
        python_image: Built, run_job, tmp_path: Path) -> None:
    assert "/test/python@sha256:" in python_image.reference
    job = run_job(
        f"name: built\nimage: {python_image.reference}\nsteps:\n  - name: probe\n    run: |\n"
        "      . /etc/os-release && echo \"os=$ID-$VERSION_CODENAME\"\n"
        "      python3 -c 'import ssl, sys; p = ssl.get_default_verify_paths(); "
        "print(\"cafile\", p.openssl_cafile); print(\"python\", sys.version_info[:2])'\n"
        "      grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt\n"
        "      cat /etc/resolv.conf | wc -c; cat /etc/hostname\n",
        **python_image.env)
    assert job.rc == 0, job.stderr + job.log
    assert "os=debian-bookworm" in job.log
    assert "cafile /usr/lib/ssl/cert.pem" in job.log and "python (3, 11)" in job.log
    counts = [int(line.split()[-1]) for line in job.output("probe").splitlines()
              if line.strip().isdigit()]
    assert counts[0] > 100  # the image's own public CA bundle
    assert job.result["image"] == python_image.reference


def test_bad_builds_and_pushes_are_refused_with_the_fix(tmp_path: Path,
                                                        plain_registry: RunningRegistry) -> None:
    home = tmp_path / "home"
    for options, words in (
            (("--include", "python3;rm"), "not a package name"),
            (("--variant", "everything"), "is not one of"),
            (("--variant", "extract", "--include", "no-such-package-here"),
             "mmdebstrap failed")):
        refused = build(home, "test/bad", *options)
        assert refused.returncode in (2, 4), refused.stderr
        assert words in refused.stderr and "hint:" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    named = run_cli(home, "image", "build", "Test/Upper", "--suite", "bookworm")
    assert named.returncode == 2 and "repository path" in named.stderr
    missing = run_cli(home, "image", "push", "test/none@sha256:" + "0" * 64,
                      f"{plain_registry.host}/test/none",
                      STOCKADE_INSECURE_REGISTRIES=plain_registry.host)
    assert missing.returncode == 2 and "was built here" in missing.stderr, missing.stderr
    malformed = run_cli(home, "image", "push", "test/none", f"{plain_registry.host}/x")
    assert malformed.returncode == 2 and "NAME@sha256:DIGEST" in malformed.stderr


def test_doctor_probes_an_image(python_image: Built, stockade_home: Path) -> None:
    """stockade doctor --image: the end-to-end probe also runs on the image."""
    done = run_cli(stockade_home, "doctor", "--json", "--image", python_image.reference,
                   **python_image.env)
    found = {f["control"]: f for f in json.loads(done.stdout)["findings"]}
    probe = found[f"end-to-end probe on {python_image.reference}"]
    assert probe["ok"] and "nothing was left behind" in probe["detail"], probe
    assert done.returncode == 0, done.stderr
    missing = run_cli(stockade_home, "doctor", "--json", "--image",
                      python_image.reference.rsplit("@", 1)[0] + "@sha256:" + "0" * 64,
                      **python_image.env)
    assert missing.returncode == 4
    failed = [f for f in json.loads(missing.stdout)["findings"] if not f["ok"] and f["required"]]
    assert [f["control"] for f in failed] == [
        f"end-to-end probe on {python_image.reference.rsplit('@', 1)[0]}@sha256:{'0' * 64}"]
    assert "cannot pull it" in failed[0]["detail"]
