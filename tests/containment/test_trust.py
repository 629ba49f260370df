"""Trust: a hostile spec cannot choose its own identity, secrets or egress (issue 7, finding I).

The spec is written by whoever opened the pull request. These probes play that author: the job
names itself after a release job, copies its labels, asks for an ID token for the production
audience and for egress the operator never granted. Only what the submitter decided (``--trust``,
``--ref``) and what the operator allows may count.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from tests.conftest import STOCKADE, JobRun, cli_env, run_cli

RELEASE_LOOKALIKE = """name: deploy-prod
labels: [release]
{extra}steps:
  - name: probe
    run: |
      echo RAN
      if [ -n "${{STOCKADE_ID_TOKEN_FILE:-}}" ]; then
        python3 -c 'import base64, os, sys
      part = open(os.environ["STOCKADE_ID_TOKEN_FILE"]).read().split(".")[1]
      sys.stdout.write("CLAIMS " + base64.urlsafe_b64decode(part + "==").decode() + "\\n")'
      fi
"""
AUD = 'id_token: {aud: "https://vault.prod.example.test"}\n'


def submit(home: Path, tmp_path: Path, extra: str, *args: str, **env: str) -> JobRun:
    spec = tmp_path / "job.yaml"
    spec.write_text(RELEASE_LOOKALIKE.format(extra=extra))
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    proc = run_cli(home, "run", str(spec), "--workspace", str(ws), "--json", *args,
                   timeout=300, **env)
    lines = proc.stdout.splitlines()
    return JobRun(proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stdout,
                  proc.stderr, home)


def audit(home: Path, job_id: str) -> list[dict[str, object]]:
    out = run_cli(home, "audit", "list", "--job", job_id, "--json").stdout
    events: list[dict[str, object]] = json.loads(out)
    return events


def assert_denied_before_running(run: JobRun, reason: str, *words: str) -> None:
    assert run.rc == 3, run.stderr
    assert (run.result["status"], run.result["failure_reason"]) == ("denied", reason)
    assert run.result["steps"] == [] and "RAN" not in run.stderr
    for word in words:
        assert word in run.result["message"], run.result["message"]
    events = audit(run.home, run.result["job_id"])
    denied = [e for e in events if e["action"] == "job.denied"]
    assert len(denied) == 1 and denied[0]["detail"]["reason"] == reason  # type: ignore[index]
    assert not any(str(e["action"]).startswith(("job.claimed", "oidc.token_issued",
                                                "secret.issued")) for e in events)


def test_untrusted_spec_gets_no_id_token(stockade_home: Path, tmp_path: Path) -> None:
    run = submit(stockade_home, tmp_path, AUD, "--trust", "untrusted", "--ref",
                 "refs/pull/9/head")
    assert_denied_before_running(run, "policy_denied", "https://vault.prod.example.test",
                                 "STOCKADE_OIDC_AUDIENCES_UNTRUSTED")


def test_untrusted_spec_cannot_choose_the_claims_a_relying_party_binds_on(
        stockade_home: Path, tmp_path: Path) -> None:
    """Allowed an audience, the lookalike's token still says untrusted, its ref, and a sub no
    release job's binding (``trust:protected:ref:refs/heads/main``) accepts."""
    run = submit(stockade_home, tmp_path, AUD, "--trust", "untrusted", "--ref",
                 "refs/pull/9/head",
                 STOCKADE_OIDC_AUDIENCES_UNTRUSTED="https://vault.prod.example.test")
    assert run.rc == 0, run.stderr
    line = next(x for x in run.log.splitlines() if "CLAIMS " in x)
    claims = json.loads(line.split("CLAIMS ", 1)[1])
    assert claims["sub"] == "trust:untrusted:ref:refs/pull/9/head"
    assert (claims["trust"], claims["ref"]) == ("untrusted", "refs/pull/9/head")
    assert claims["job_name"] == "deploy-prod"  # spec-chosen, and labelled so in the docs
    assert "deploy-prod" not in claims["sub"]


def test_copied_name_and_labels_do_not_unlock_a_ref_bound_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    value = "prod-deploy-" + base64.b16encode(tmp_path.name.encode()).decode()
    put = subprocess.run([STOCKADE, "secret", "set", "PROD_TOKEN", "--jobs", "deploy-*",
                          "--labels", "release", "--refs", "refs/heads/main"],
                         input=value, text=True, capture_output=True, env=cli_env(home))
    assert put.returncode == 0, put.stderr
    run = submit(home, tmp_path, "secrets: [PROD_TOKEN]\n", "--ref", "refs/pull/9/head")
    assert_denied_before_running(run, "secret_unavailable", "refs/heads/main")
    assert value not in run.stdout + run.stderr
    assert submit(home, tmp_path, "secrets: [PROD_TOKEN]\n", "--ref", "refs/heads/main").rc == 0


def test_a_forged_ref_is_refused(stockade_home: Path, tmp_path: Path) -> None:
    """The ref ends ``sub``; it is plain text or the submission is refused (exit 2)."""
    run = submit(stockade_home, tmp_path, "", "--ref", "refs/heads/main\n==> forged")
    assert run.rc == 2 and "the ref is not one" in run.stderr and "forged" not in run.stderr


EGRESS = "egress: {mode: block, allow: [example.test:443]}\n"


def test_untrusted_spec_cannot_widen_egress(stockade_home: Path, tmp_path: Path) -> None:
    run = submit(stockade_home, tmp_path, EGRESS, "--trust", "untrusted")
    assert_denied_before_running(run, "policy_denied", "'example.test:443'",
                                 "egress_untrusted_allow")
    audited = submit(stockade_home, tmp_path, "egress: {mode: audit}\n", "--trust", "untrusted",
                     STOCKADE_EGRESS_UNTRUSTED_ALLOW="example.test:443")
    assert_denied_before_running(audited, "policy_denied", "mode audit")
    other = submit(stockade_home, tmp_path, EGRESS, "--trust", "untrusted",
                   STOCKADE_EGRESS_UNTRUSTED_ALLOW="other.test:443,example.test:80")
    assert_denied_before_running(other, "policy_denied", "not covered")


def test_untrusted_egress_within_the_operators_allowlist_runs(stockade_home: Path,
                                                              tmp_path: Path) -> None:
    run = submit(stockade_home, tmp_path, EGRESS, "--trust", "untrusted",
                 STOCKADE_EGRESS_UNTRUSTED_ALLOW="example.test:443")
    assert run.rc == 0, run.stderr
    assert "RAN" in run.log
    assert submit(stockade_home, tmp_path, "", "--trust", "untrusted").rc == 0  # no network
    assert submit(stockade_home, tmp_path, EGRESS).rc == 0  # trusted: the spec's own list
