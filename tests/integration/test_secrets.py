"""Secrets end to end: the CLI, scopes, delivery, masking, leases, leaks, nothing on disk."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from stockade.config import Settings
from stockade.secrets.broker import Broker
from stockade.secrets.vault import Vault
from stockade.store.sqlite import SqliteStore
from tests.conftest import STOCKADE, JobRun, cli_env, run_cli

VALUE = "s3cr3t-Value-for-tests-" + os.urandom(6).hex()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A state directory with two secrets."""
    h = tmp_path / "home"
    put(h, "DEPLOY_TOKEN", VALUE, "--jobs", "deploy-*")
    put(h, "SIGNING_KEY", "file-" + VALUE, "--jobs", "deploy-*", "--labels", "release",
        "--trust", "protected")
    return h


def put(home: Path, name: str, value: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([STOCKADE, "secret", "set", name, *args], input=value + "\n",
                          capture_output=True, text=True, env=cli_env(home))
    assert proc.returncode == 0, proc.stderr
    return proc


def job(home: Path, tmp_path: Path, spec: str, *args: str) -> JobRun:
    path = tmp_path / "job.yaml"
    path.write_text(spec)
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    proc = run_cli(home, "run", str(path), "--workspace", str(ws), "--json", *args)
    return JobRun(proc.returncode, json.loads(proc.stdout), proc.stdout, proc.stderr, home)


DEPLOY = """name: deploy-web
labels: [release]
secrets: [DEPLOY_TOKEN, {{name: SIGNING_KEY, as: file}}]
artifacts: ["out/**"]
steps:
  - name: use
    run: |
{script}
"""


def deploy(script: str) -> str:
    return DEPLOY.format(script="\n".join("      " + line for line in script.splitlines()))


def test_list_shows_scopes_never_values(home: Path) -> None:
    listing = run_cli(home, "secret", "list")
    assert "DEPLOY_TOKEN" in listing.stdout and "jobs=deploy-*" in listing.stdout
    assert "trust=protected" in listing.stdout and "labels=release" in listing.stdout
    assert "refs=*" in listing.stdout
    assert VALUE not in listing.stdout + listing.stderr


def test_values_never_come_from_argv_and_short_ones_are_refused(home: Path) -> None:
    assert run_cli(home, "secret", "set", "X", VALUE).returncode == 2  # no value argument
    short = subprocess.run([STOCKADE, "secret", "set", "SHORT"], input="abc", text=True,
                           capture_output=True, env=cli_env(home))
    assert short.returncode == 2 and "shorter than 4 characters" in short.stderr
    assert "cannot be masked" in short.stderr
    empty = subprocess.run([STOCKADE, "secret", "set", "EMPTY"], input="", text=True,
                           capture_output=True, env=cli_env(home))
    assert empty.returncode == 2 and "the value of EMPTY is empty" in empty.stderr
    assert "standard input" in empty.stderr


def test_delivery_masking_and_file_permissions(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, deploy(
        'echo "env: $DEPLOY_TOKEN"\n'
        'printf %s "$DEPLOY_TOKEN" | base64\n'
        'printf %s "$DEPLOY_TOKEN" | base64 -w0 | cut -c3-; echo\n'
        'python3 -c "import os,json,urllib.parse as u; t=os.environ[\'DEPLOY_TOKEN\'];'
        ' print(json.dumps(t), u.quote(t), t.encode().hex())"\n'
        'stat -c "%a %U %s" /run/secrets/SIGNING_KEY\n'
        'cat /run/secrets/SIGNING_KEY; echo\n'
        'echo "DEPLOY_TOKEN in env: ${DEPLOY_TOKEN:+yes}; SIGNING_KEY in env: ${SIGNING_KEY:-no}"'),
        "--trust", "protected")
    assert run.rc == 0, run.stderr
    for text in (run.stderr, run.log):
        assert VALUE not in text
        assert base64.b64encode(VALUE.encode()).decode()[:20] not in text
        assert VALUE.encode().hex() not in text
    assert "env: ***" in run.log
    assert f"400 ci {len('file-' + VALUE)}" in run.log  # 0400, the job user, the length
    assert "DEPLOY_TOKEN in env: yes; SIGNING_KEY in env: no" in run.log


def test_add_mask_masks_derived_values(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, deploy(
        'derived=$(printf %s "$DEPLOY_TOKEN" | rev)\n'
        'echo "::add-mask::$derived"\n'
        'echo "derived: $derived"; echo "again $derived"'), "--trust", "protected")
    derived = VALUE[::-1]
    assert derived not in run.log and derived not in run.stderr
    assert "derived: ***" in run.log and "::add-mask::***" in run.log
    assert "secret.mask_registered" in run_cli(home, "show", run.result["job_id"]).stdout


@pytest.mark.parametrize("name, labels, trust, ok, why", [
    ("deploy-web", "[release]", "protected", True, ""),
    ("deploy-web", "[release]", "trusted", False, "needs trust 'protected'"),
    ("deploy-web", "[]", "protected", False, "needs the job labels release"),
    ("build-web", "[release]", "protected", False, "scoped to jobs matching 'deploy-*'"),
    ("deploy-web", "[release]", "untrusted", False, "never receive secrets"),
])
def test_scope_matrix(home: Path, tmp_path: Path, name: str, labels: str, trust: str,
                      ok: bool, why: str) -> None:
    spec = (f"name: {name}\nlabels: {labels}\nsecrets: [SIGNING_KEY]\n"
            "steps:\n  - {name: a, run: 'true'}\n")
    run = job(home, tmp_path, spec, "--trust", trust)
    if ok:
        assert run.rc == 0, run.stderr
        return
    assert run.rc == 3
    assert (run.result["status"], run.result["failure_reason"]) == ("denied",
                                                                     "secret_unavailable")
    assert why in run.result["message"]
    audit = run_cli(home, "show", run.result["job_id"]).stdout
    assert "secret.refused" in audit and "secret.issued" not in audit


@pytest.mark.parametrize("ref, ok", [
    ("refs/pull/1/head", False),
    ("refs/heads/main-evil", False),
    ("local", False),
    ("refs/heads/main", True),
])
def test_scope_binds_on_the_ref(home: Path, tmp_path: Path, ref: str, ok: bool) -> None:
    """A spec can copy any name and labels; the ref comes from the submitter."""
    put(home, "MAIN_TOKEN", "main-" + VALUE, "--refs", "refs/heads/main")
    spec = ("name: deploy-web\nsecrets: [MAIN_TOKEN]\n"
            "steps:\n  - {name: a, run: 'test -n \"$MAIN_TOKEN\" && echo GOT'}\n")
    run = job(home, tmp_path, spec, "--ref", ref)
    if ok:
        assert run.rc == 0, run.stderr
        assert "GOT" in run.log
        return
    assert run.rc == 3
    assert (run.result["status"], run.result["failure_reason"]) == ("denied",
                                                                     "secret_unavailable")
    assert f"scoped to refs matching 'refs/heads/main', not {ref!r}" in run.result["message"]
    audit = run_cli(home, "show", run.result["job_id"]).stdout
    assert "secret.refused" in audit and "secret.issued" not in audit


def test_ref_globs_list_and_rotate(home: Path, tmp_path: Path) -> None:
    put(home, "TAG_TOKEN", "tag-" + VALUE, "--refs", "refs/tags/*", "--trust", "protected")
    listing = run_cli(home, "secret", "list").stdout
    assert "refs=refs/tags/*" in listing and "refs=*" in listing  # older secrets: any ref
    spec = "name: release\nsecrets: [TAG_TOKEN]\nsteps:\n  - {name: a, run: 'true'}\n"
    assert job(home, tmp_path, spec, "--ref", "refs/tags/v1.2.0", "--trust", "protected").rc == 0
    assert job(home, tmp_path, spec, "--ref", "refs/tags/v1.2.0").rc == 3  # trust too low
    rotated = subprocess.run([STOCKADE, "secret", "rotate", "TAG_TOKEN", "--refs",
                              "refs/heads/release"], input="new-" + VALUE,
                             capture_output=True, text=True, env=cli_env(home))
    assert rotated.returncode == 0, rotated.stderr
    assert "refs=refs/heads/release" in run_cli(home, "secret", "list").stdout
    assert job(home, tmp_path, spec, "--ref", "refs/tags/v1.2.0", "--trust", "protected").rc == 3
    bad = subprocess.run([STOCKADE, "secret", "set", "BAD_REFS", "--refs", "refs/heads/a b"],
                         input=VALUE, capture_output=True, text=True, env=cli_env(home))
    assert bad.returncode == 2 and "is not a ref glob" in bad.stderr


def test_setting_an_existing_secret_never_widens_its_scope_unasked(home: Path) -> None:
    put(home, "WIDEN_ME", "widen-" + VALUE, "--refs", "refs/heads/main", "--trust", "protected",
        "--jobs", "release-*", "--labels", "release")
    again = subprocess.run([STOCKADE, "secret", "set", "WIDEN_ME"], input="widen2-" + VALUE,
                           capture_output=True, text=True, env=cli_env(home))
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr
    listed = run_cli(home, "secret", "list").stdout
    assert "refs=refs/heads/main" in listed and "trust=protected" in listed
    assert "jobs=release-*" in listed and "labels=release" in listed
    changed = subprocess.run([STOCKADE, "secret", "set", "WIDEN_ME", "--trust", "trusted"],
                             input="widen3-" + VALUE, capture_output=True, text=True,
                             env=cli_env(home))  # asked for: done, and said loudly
    assert changed.returncode == 0, changed.stderr
    assert "scope of WIDEN_ME changed from refs=refs/heads/main trust=protected" \
        in changed.stderr
    assert "stockade secret rotate WIDEN_ME" in changed.stderr


def test_unknown_secret_is_denied(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, "name: x\nsecrets: [NOPE]\nsteps:\n  - {name: a, run: 'true'}\n")
    assert run.rc == 3 and "there is no secret named NOPE" in run.result["message"]


def test_leases_are_revoked_and_late_use_is_refused_and_audited(home: Path,
                                                               tmp_path: Path) -> None:
    run = job(home, tmp_path, deploy("true"), "--trust", "protected")
    job_id = run.result["job_id"]
    db = sqlite3.connect(home / "stockade.db")
    leases = db.execute("SELECT id, attempt, runner_id, revoked_at FROM leases WHERE job_id = ?",
                        (job_id,)).fetchall()
    assert len(leases) == 2 and all(row[3] is not None for row in leases)
    store = SqliteStore(home / "stockade.db")
    broker = Broker(store, lambda: Vault.open(Settings(home).master_key_path, False), "test")
    lease_id, attempt, runner_id, _ = leases[0]
    from stockade.errors import PolicyDenied

    with pytest.raises(PolicyDenied, match="revoked when its job ended"):
        broker.redeem(lease_id, job_id, attempt, runner_id)
    with pytest.raises(PolicyDenied, match="belongs to another job"):
        broker.redeem(lease_id, "another-job", attempt, runner_id)
    audit = run_cli(home, "show", job_id).stdout
    assert audit.count("secret.revoked") == 2
    assert audit.count("secret.lease_refused") == 2


def test_leaked_artifact_is_withheld_and_fails_the_job(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, deploy(
        'mkdir -p out; echo fine > out/ok.txt\n'
        'printf %s "$DEPLOY_TOKEN" | base64 > out/token.b64\n'
        'cp /run/secrets/SIGNING_KEY out/key.copy'), "--trust", "protected")
    assert run.rc == 1
    assert run.result["failure_reason"] == "secret_leak"
    assert run.result["exit_code"] is None  # the steps succeeded: no exit code explains it
    assert [a["path"] for a in run.result["artifacts"]] == ["out/ok.txt"]
    leaks = {leak["where"]: leak["secrets"] for leak in run.result["secret_leaks"]}
    assert leaks == {"artifact out/key.copy": ["SIGNING_KEY"],
                     "artifact out/token.b64": ["DEPLOY_TOKEN"]}
    art = run.home / "artifacts" / run.result["job_id"] / "out"
    assert sorted(p.name for p in art.iterdir()) == ["ok.txt"]
    audit = run_cli(home, "show", run.result["job_id"]).stdout
    assert audit.count("secret.leak") == 2


def test_plaintext_is_never_on_disk(home: Path, tmp_path: Path) -> None:
    job(home, tmp_path, deploy('echo "$DEPLOY_TOKEN"; cat /run/secrets/SIGNING_KEY'),
        "--trust", "protected")
    forms = [VALUE.encode(), base64.b64encode(VALUE.encode()), VALUE.encode().hex().encode()]
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(f in data for f in forms), path
    assert (home / "master.key").stat().st_mode & 0o777 == 0o600


def test_no_secret_in_the_runners_argv_or_environment(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(deploy('echo started; sleep 3'))
    (tmp_path / "ws").mkdir()
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(tmp_path / "ws"),
                             "--trust", "protected"], env=cli_env(home),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            break
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    runner_env = Path(f"/proc/{proc.pid}/environ").read_bytes()
    proc.wait(timeout=30)
    assert VALUE not in ps
    assert VALUE.encode() not in runner_env


def test_rotate_and_rm(home: Path, tmp_path: Path) -> None:
    new = "rotated-" + VALUE
    rotated = subprocess.run([STOCKADE, "secret", "rotate", "DEPLOY_TOKEN"], input=new,
                             capture_output=True, text=True, env=cli_env(home))
    assert "version 2" in rotated.stdout
    run = job(home, tmp_path, deploy('test "$DEPLOY_TOKEN" = "' + new + '" && echo ROTATED'),
              "--trust", "protected")
    assert "ROTATED" in run.log and new not in run.log
    assert run_cli(home, "secret", "rm", "DEPLOY_TOKEN").returncode == 0
    assert run_cli(home, "secret", "rm", "DEPLOY_TOKEN").returncode == 2
    assert "DEPLOY_TOKEN" not in run_cli(home, "secret", "list").stdout


def test_operator_master_key_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = tmp_path / "operator.key"
    env = {"STOCKADE_MASTER_KEY_FILE": str(key)}
    missing = subprocess.run([STOCKADE, "secret", "set", "A_SECRET"], input=VALUE, text=True,
                             capture_output=True, env=cli_env(home, **env))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    key.write_text("stockade-master-key-v1 " + base64.b64encode(os.urandom(32)).decode())
    key.chmod(0o644)
    loose = subprocess.run([STOCKADE, "secret", "set", "A_SECRET"], input=VALUE, text=True,
                           capture_output=True, env=cli_env(home, **env))
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    key.chmod(0o600)
    ok = subprocess.run([STOCKADE, "secret", "set", "A_SECRET"], input=VALUE, text=True,
                        capture_output=True, env=cli_env(home, **env))
    assert ok.returncode == 0, ok.stderr
    assert not (home / "master.key").exists()


def test_audit_never_holds_values(home: Path, tmp_path: Path) -> None:
    job(home, tmp_path, deploy('echo "$DEPLOY_TOKEN"'), "--trust", "protected")
    db = sqlite3.connect(home / "stockade.db")
    details = " ".join(r[0] for r in db.execute("SELECT detail_json FROM audit_events"))
    assert VALUE not in details and "DEPLOY_TOKEN" in details


def test_secret_removed_between_admission_and_claim(home: Path) -> None:
    from stockade.control import ControlService
    from stockade.spec.parse import parse_spec

    store = SqliteStore(home / "stockade.db")
    broker = Broker(store, lambda: Vault.open(Settings(home).master_key_path, False), "test")
    control = ControlService(store, "test", broker=broker)
    spec = parse_spec("name: deploy-x\nsecrets: [DEPLOY_TOKEN]\n"
                      "steps:\n  - {name: a, run: 'true'}\n").to_job()
    job = control.submit(spec)
    assert job.status == "queued"
    broker.remove("DEPLOY_TOKEN")
    assignment = control.claim("r1", (), job.id)
    assert assignment is not None
    from stockade.errors import PolicyDenied

    with pytest.raises(PolicyDenied, match="no such lease"):
        control.redeem(assignment.secrets[0].lease_id, job.id, 1, "r1")
    actions = [e.action for e in control.audit_trail(job.id)]
    assert "secret.refused" in actions and "secret.lease_refused" in actions
