"""ID tokens in real jobs: delivered as a file, refreshed, masked, verified independently."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import jwt
from jwt.algorithms import ECAlgorithm

from tests.conftest import STOCKADE, cli_env, job_dir, run_cli

SPEC = """name: deploy-oidc
id_token: {aud: "https://vault.example.test"}
steps:
  - name: token
    run: |
      echo "file: $STOCKADE_ID_TOKEN_FILE"
      cat "$STOCKADE_ID_TOKEN_FILE"; echo
      echo started
      sleep 3
"""


def tokens_during_job(home: Path, tmp_path: Path) -> tuple[list[str], str, str]:
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC)
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(tmp_path),
                             "--ref", "refs/heads/main", "--json"],
                            env=cli_env(home, STOCKADE_OIDC_REFRESH="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    err = []
    for line in proc.stderr:
        err.append(line)
        if "started" in line:
            break
    job_id = json.loads(run_cli(home, "jobs", "--json").stdout)[0]["job_id"]
    seen = []
    for _ in range(25):
        token_file = job_dir(home, job_id) / "identity" / "token"
        if token_file.exists():
            token = token_file.read_text()
            if token not in seen:
                seen.append(token)
        time.sleep(0.1)
    out, rest = proc.communicate(timeout=60)
    return seen, "".join(err) + rest, out


def test_token_is_delivered_refreshed_masked_and_verifiable(stockade_home: Path,
                                                            tmp_path: Path) -> None:
    tokens, stderr, stdout = tokens_during_job(stockade_home, tmp_path)
    assert len(tokens) >= 2, "the token was not refreshed"
    result = json.loads(stdout)
    assert result["status"] == "succeeded"
    assert "file: /run/stockade/identity/token" in stderr
    for token in tokens:
        assert token not in stderr
    jwks = json.loads(run_cli(stockade_home, "oidc", "jwks").stdout)
    discovery = json.loads(run_cli(stockade_home, "oidc", "discovery").stdout)
    for token in tokens:
        kid = jwt.get_unverified_header(token)["kid"]
        key = ECAlgorithm.from_jwk(json.dumps(next(k for k in jwks["keys"] if k["kid"] == kid)))
        claims = jwt.decode(token, key, algorithms=["ES256"],  # type: ignore[arg-type]
                            audience="https://vault.example.test", issuer=discovery["issuer"])
        assert claims["sub"] == "trust:trusted:ref:refs/heads/main"
        assert claims["job_name"] == "deploy-oidc" and claims["ref"] == "refs/heads/main"
        assert claims["job_id"] == result["job_id"] and claims["attempt"] == 1
        assert claims["runner_id"] == result["runner_id"]
        assert claims["trust"] == "trusted" and claims["image_digest"] == "host"
    assert len({jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens}) \
        == len(tokens)
    audit = run_cli(stockade_home, "show", result["job_id"]).stdout
    assert audit.count("oidc.token_issued") >= 2


def test_no_token_without_id_token(run_job) -> None:
    run = run_job("name: plain\nsteps:\n  - name: a\n    run: |\n"
                  "      echo \"[${STOCKADE_ID_TOKEN_FILE:-none}]\"; ls /run/stockade/\n")
    assert "[none]" in run.log and "identity" not in run.output("a")


def test_rotate_via_cli_keeps_old_key_published(stockade_home: Path) -> None:
    before = {k["kid"] for k in json.loads(run_cli(stockade_home, "oidc", "jwks").stdout)["keys"]}
    rotated = run_cli(stockade_home, "oidc", "rotate")
    assert rotated.returncode == 0 and "previous key stays published" in rotated.stdout
    after = {k["kid"] for k in json.loads(run_cli(stockade_home, "oidc", "jwks").stdout)["keys"]}
    assert before < after and len(after - before) == 1


def run_spec(home: Path, tmp_path: Path, spec: str, *args: str, **env: str
             ) -> tuple[int, dict[str, object], str]:
    path = tmp_path / "job.yaml"
    path.write_text(spec)
    proc = run_cli(home, "run", str(path), "--workspace", str(tmp_path), "--json", *args,
                   timeout=300, **env)
    return proc.returncode, json.loads(proc.stdout.splitlines()[-1]), proc.stderr


TOKEN_SPEC = """name: release-prod
id_token: {aud: "https://vault.example.test"}
steps:
  - name: token
    run: |
      python3 -c 'import base64, os, sys
      part = open(os.environ["STOCKADE_ID_TOKEN_FILE"]).read().split(".")[1]
      sys.stdout.write(base64.urlsafe_b64decode(part + "==").decode() + "\\n")'
"""


def test_untrusted_jobs_get_no_token_by_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rc, result, stderr = run_spec(home, tmp_path, TOKEN_SPEC, "--trust", "untrusted",
                                  "--ref", "refs/pull/1/head")
    assert rc == 3
    assert (result["status"], result["failure_reason"]) == ("denied", "policy_denied")
    message = str(result["message"])
    assert "'untrusted' may not get an ID token for audience 'https://vault.example.test'" \
        in message
    assert "STOCKADE_OIDC_AUDIENCES_UNTRUSTED" in message and "oidc_audiences_untrusted" in stderr
    audit = run_cli(home, "audit", "list", "--json").stdout
    denied = [e for e in json.loads(audit) if e["action"] == "job.denied"]
    assert denied and denied[0]["detail"]["reason"] == "policy_denied"
    assert "oidc.token_issued" not in audit


def test_untrusted_job_gets_an_allowed_audience(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rc, result, stderr = run_spec(home, tmp_path, TOKEN_SPEC, "--trust", "untrusted",
                                  "--ref", "refs/pull/1/head",
                                  STOCKADE_OIDC_AUDIENCES_UNTRUSTED="https://vault.example.test")
    assert rc == 0, stderr
    log = (home / "logs" / f"{result['job_id']}.log").read_text()
    assert '"sub":"trust:untrusted:ref:refs/pull/1/head"' in log
    assert '"trust":"untrusted"' in log and '"job_name":"release-prod"' in log


def test_trusted_audiences_can_be_narrowed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rc, result, _ = run_spec(home, tmp_path, TOKEN_SPEC,
                             STOCKADE_OIDC_AUDIENCES_TRUSTED="sts.example.test,vault")
    assert rc == 3 and result["failure_reason"] == "policy_denied"
    assert "STOCKADE_OIDC_AUDIENCES_TRUSTED" in str(result["message"])
    assert "'sts.example.test', 'vault'" in str(result["message"])
