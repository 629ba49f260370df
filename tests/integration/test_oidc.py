"""ID tokens in real jobs: delivered as a file, refreshed, masked, verified independently."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import jwt
from jwt.algorithms import ECAlgorithm

from tests.conftest import STOCKADE, cli_env, run_cli

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
        token_file = Path(f"/run/stockade/{job_id}/identity/token")
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
        assert claims["sub"] == "job:deploy-oidc:ref:refs/heads/main"
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
