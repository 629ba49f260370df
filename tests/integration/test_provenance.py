"""``stockade provenance`` and ``stockade verify`` on a real job's artifacts (embedded path;
the server's route is exercised in test_fleet.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import run_cli

SPEC = ("name: release\nartifacts: [dist/*]\nsteps:\n  - {name: build, run: 'mkdir -p dist; "
        "echo app > dist/app.txt; echo v1 > dist/VERSION'}\n")


def test_a_jobs_artifacts_verify_against_its_provenance(run_job, tmp_path: Path) -> None:
    job = run_job(SPEC)
    assert job.rc == 0, job.stderr
    job_id, home = job.result["job_id"], job.home
    made = run_cli(home, "provenance", job_id[:10])
    assert made.returncode == 0, made.stderr
    envelope = json.loads(made.stdout)
    assert run_cli(home, "provenance", job_id).stdout == made.stdout  # the same bytes again
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert sorted(s["name"] for s in statement["subject"]) == ["dist/VERSION", "dist/app.txt"]
    (tmp_path / "release.intoto.json").write_text(made.stdout)
    artifact = home / "artifacts" / job_id / "dist" / "app.txt"
    ok = run_cli(home, "verify", str(artifact), "--provenance",
                 str(tmp_path / "release.intoto.json"))
    assert ok.returncode == 0, ok.stderr
    assert "verified: dist/app.txt" in ok.stdout and f"invocation {job_id}/1" in ok.stdout
    # elsewhere: with the public key printed by the control plane
    public = run_cli(home, "provenance", "--public-key")
    (tmp_path / "key.pub").write_text(public.stdout)
    copy = tmp_path / "app.txt"
    copy.write_bytes(artifact.read_bytes())
    elsewhere = run_cli(tmp_path / "other-home", "verify", str(copy), "--provenance",
                        str(tmp_path / "release.intoto.json"), "--key", str(tmp_path / "key.pub"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    # without --key another host checks with its own control plane's key: it says so
    foreign = run_cli(tmp_path / "other-home", "verify", str(copy), "--provenance",
                      str(tmp_path / "release.intoto.json"))
    assert foreign.returncode == 1 and "pass --key" in foreign.stderr, foreign.stderr
    # a changed artifact, another key, a changed envelope: not verified (exit 1), said why
    copy.write_bytes(b"app\x00")
    changed = run_cli(home, "verify", str(copy), "--provenance",
                      str(tmp_path / "release.intoto.json"))
    assert changed.returncode == 1 and "no subject" in changed.stderr
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "other.pub").write_bytes(other)
    wrong_key = run_cli(home, "verify", str(artifact), "--provenance",
                        str(tmp_path / "release.intoto.json"), "--key",
                        str(tmp_path / "other.pub"))
    assert wrong_key.returncode == 1 and "no signature" in wrong_key.stderr
    envelope["payload"] = base64.b64encode(base64.b64decode(envelope["payload"]).replace(
        b"dist/app.txt", b"dist/app.TXT")).decode()
    (tmp_path / "forged.json").write_text(json.dumps(envelope))
    forged = run_cli(home, "verify", str(artifact), "--provenance", str(tmp_path / "forged.json"))
    assert forged.returncode == 1 and "NOT verified" in forged.stderr


def test_no_provenance_without_artifacts_and_plain_errors(run_job, tmp_path: Path) -> None:
    job = run_job("name: plain\nsteps:\n  - {name: a, run: 'true'}\n")
    assert job.rc == 0, job.stderr
    none = run_cli(job.home, "provenance", job.result["job_id"])
    assert none.returncode == 2 and "no artifacts" in none.stderr
    assert "Traceback" not in none.stderr
    both = run_cli(job.home, "provenance")
    assert both.returncode == 2 and "--public-key" in both.stderr
    missing = run_cli(job.home, "verify", str(tmp_path / "nope"), "--provenance",
                      str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    (tmp_path / "a").write_text("a")
    (tmp_path / "junk.json").write_text("[" * 50_000)
    junk = run_cli(job.home, "verify", str(tmp_path / "a"), "--provenance",
                   str(tmp_path / "junk.json"))
    assert junk.returncode == 1 and "not JSON" in junk.stderr and "Traceback" not in junk.stderr
    assert "pass --key" not in junk.stderr  # (not a key problem: no key advice)
    (tmp_path / "bad.pub").write_text("not a key")
    bad_key = run_cli(job.home, "verify", str(tmp_path / "a"), "--provenance",
                      str(tmp_path / "junk.json"), "--key", str(tmp_path / "bad.pub"))
    assert bad_key.returncode == 2 and "not a PEM public key" in bad_key.stderr
