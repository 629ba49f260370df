"""``stockade run`` end to end as a user runs it: real bwrap, cgroups, SQLite, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import STOCKADE, cli_env, run_cli

REPO = Path(__file__).resolve().parents[2]


def test_demo_job_builds_tests_and_stores_artifacts(run_job, tmp_path: Path) -> None:
    ws = tmp_path / "demo"
    shutil.copytree(REPO / "examples" / "demo", ws)
    run = run_job((ws / "job.yaml").read_text(), workspace=ws)
    assert run.rc == 0, run.stderr
    assert run.result["status"] == "succeeded"
    assert run.step_status == ["succeeded"] * 3
    assert len(run.stdout.splitlines()) == 1  # --json: one line, nothing else
    paths = {a["path"]: a for a in run.result["artifacts"]}
    assert set(paths) == {"dist/calc-0.1.tar.gz", "dist/SHA256SUMS"}
    stored = run.home / "artifacts" / run.result["job_id"] / "dist" / "SHA256SUMS"
    assert paths["dist/calc-0.1.tar.gz"]["sha256"] in stored.read_text()
    assert "Ran 3 tests" in run.stderr and "==> step test" in run.stderr
    assert "running as ci (uid 1000)" in run.log
    assert not (ws / "dist").exists()  # the user's directory is never written


def test_result_has_the_contract_keys(run_job) -> None:
    run = run_job("name: keys\nsteps:\n  - {name: a, run: 'true'}\n")
    for key in ("job_id", "status", "failure_reason", "exit_code", "steps", "artifacts",
                "egress", "duration_s"):
        assert key in run.result
    assert run.result["egress"] == {"allowed": [], "denied": [], "audit_would_deny": []}
    assert run.result["steps"][0].keys() == {"name", "status", "exit_code", "duration_s"}


def test_script_failure_stops_at_the_failing_step(run_job) -> None:
    run = run_job("name: f\nsteps:\n  - {name: a, run: 'exit 7'}\n  - {name: b, run: 'true'}\n")
    assert run.rc == 1
    assert (run.result["status"], run.result["failure_reason"]) == ("failed", "script_failure")
    assert run.result["exit_code"] == 7
    assert [s["name"] for s in run.result["steps"]] == ["a"]
    assert "step a failed with exit code 7" in run.stderr


def test_pipefail_and_errexit(run_job) -> None:
    run = run_job("name: p\nsteps:\n  - name: a\n    run: |\n"
                  "      false | true\n      echo SHOULD-NOT-PRINT\n")
    assert run.rc == 1 and "SHOULD-NOT-PRINT" not in run.log


def test_invalid_spec_exits_2_without_a_traceback(stockade_home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nsteps:\n  - name: a\n    run: echo\n    timeout: 5 minutes\n")
    proc = run_cli(stockade_home, "run", str(spec), "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "steps[0].timeout: '5 minutes' is not a duration; use e.g. 90s" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_2(stockade_home: Path, tmp_path: Path) -> None:
    missing = run_cli(stockade_home, "run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read the file" in missing.stderr
    spec = tmp_path / "ok.yaml"
    spec.write_text("name: x\nsteps:\n  - {name: a, run: 'true'}\n")
    bad_ws = run_cli(stockade_home, "run", str(spec), "--workspace", str(tmp_path / "no-dir"))
    assert bad_ws.returncode == 2 and "is not a directory" in bad_ws.stderr
    assert run_cli(stockade_home, "frobnicate").returncode == 2
    unknown = run_cli(stockade_home, "show", "jzzzzzz")
    assert unknown.returncode == 2 and "stockade jobs" in unknown.stderr
    for proc in (missing, bad_ws, unknown):
        assert "Traceback" not in proc.stderr


def test_denied_job_exits_3_and_is_audited(run_job, stockade_home: Path) -> None:
    run = run_job("name: d\nsecrets: [PYPI_TOKEN]\nsteps:\n  - {name: a, run: 'true'}\n")
    assert run.rc == 3
    assert (run.result["status"], run.result["failure_reason"]) == ("denied",
                                                                     "secret_unavailable")
    show = run_cli(stockade_home, "show", run.result["job_id"])
    assert "job.denied" in show.stdout


def test_infrastructure_error_exits_4(run_job) -> None:
    run = run_job("name: i\nsteps:\n  - {name: a, run: 'true'}\n",
                  STOCKADE_UID_POOL="12-34")
    assert run.rc == 4
    assert (run.result["status"], run.result["failure_reason"]) == ("error", "system_error")
    assert "uid_pool '12-34' must lie within 65536-" in run.result["error"]


def test_step_timeout(run_job) -> None:
    run = run_job("name: t\nsteps:\n  - {name: a, run: 'sleep 30', timeout: 1s}\n")
    assert (run.rc, run.result["failure_reason"]) == (1, "timeout")
    assert run.result["steps"][0]["status"] == "timed_out"
    assert run.result["duration_s"] < 10


def test_job_timeout_spans_steps(run_job) -> None:
    run = run_job("name: t\nresources: {timeout: 4s}\nsteps:\n"
                  "  - {name: a, run: 'sleep 1'}\n  - {name: b, run: 'sleep 30'}\n")
    assert (run.rc, run.result["failure_reason"]) == (1, "timeout")
    assert run.step_status == ["succeeded", "timed_out"]


def test_oom_is_reported_as_oom(run_job) -> None:
    run = run_job("name: m\nresources: {memory: 64Mi}\nsteps:\n  - name: a\n"
                  "    run: python3 -c 'x = bytearray(512 * 1024 * 1024); print(len(x))'\n")
    assert (run.rc, run.result["failure_reason"]) == (1, "oom")
    assert run.result["steps"][0]["status"] == "oom"
    assert "out of memory" in run.stderr


def test_environment_is_clean_and_documented(run_job) -> None:
    run = run_job("name: e\nenv: {GREETING: hello}\nsteps:\n  - {name: a, run: env}\n",
                  AWS_SECRET_ACCESS_KEY="host-credential-xyz", STOCKADE_LOG_CAP="999999")
    env = dict(line.split("=", 1) for line in run.output("a").splitlines() if "=" in line)
    assert env["GREETING"] == "hello" and env["CI"] == "true"
    assert env["STOCKADE_JOB_ID"] == run.result["job_id"]
    assert env["STOCKADE_STEP"] == "a" and env["HOME"] == "/tmp"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "STOCKADE_LOG_CAP" not in env
    allowed = {"GREETING", "CI", "STOCKADE", "STOCKADE_JOB_ID", "STOCKADE_JOB_NAME",
               "STOCKADE_ATTEMPT", "STOCKADE_STEP", "STOCKADE_WORKSPACE", "HOME", "TMPDIR",
               "USER", "LOGNAME", "LANG", "PATH", "PWD", "SHLVL", "_"}
    assert set(env) <= allowed, set(env) - allowed


def test_workspace_and_tmp_persist_across_steps(run_job, tmp_path: Path) -> None:
    ws = tmp_path / "src"
    ws.mkdir()
    (ws / "input.txt").write_text("from the host\n")
    run = run_job("name: w\nsteps:\n"
                  "  - {name: a, run: 'cat input.txt > out.txt; echo t > /tmp/t'}\n"
                  "  - {name: b, run: 'cat out.txt /tmp/t'}\n", workspace=ws)
    assert run.rc == 0
    assert "from the host" in run.log
    assert not (ws / "out.txt").exists()


def test_jobs_show_and_logs(run_job, stockade_home: Path) -> None:
    run = run_job("name: listed\nsteps:\n  - {name: a, run: 'echo unique-line-42'}\n")
    job_id = run.result["job_id"]
    jobs = run_cli(stockade_home, "jobs", "--json")
    assert job_id in [j["job_id"] for j in json.loads(jobs.stdout)]
    table = run_cli(stockade_home, "jobs")
    assert job_id in table.stdout and "succeeded" in table.stdout
    show = run_cli(stockade_home, "show", job_id[:12])
    for action in ("job.admitted", "job.claimed", "job.succeeded"):
        assert action in show.stdout
    shown = json.loads(run_cli(stockade_home, "show", job_id, "--json").stdout)
    assert shown["job_id"] == job_id and shown["status"] == "succeeded"
    logs = run_cli(stockade_home, "logs", job_id)
    assert "unique-line-42" in logs.stdout


def test_state_directory_is_private_and_audit_chain_holds(run_job, stockade_home: Path) -> None:
    run_job("name: s\nsteps:\n  - {name: a, run: 'true'}\n")
    assert stat.S_IMODE(stockade_home.stat().st_mode) == 0o700
    from stockade.audit import AuditEvent, verify_chain

    db = sqlite3.connect(stockade_home / "stockade.db")
    rows = db.execute("SELECT at, actor, action, job_id, detail_json, prev_hash, hash "
                      "FROM audit_events ORDER BY seq").fetchall()
    records = [(AuditEvent(r[1], r[2], r[0], r[3], json.loads(r[4])), r[5], r[6]) for r in rows]
    assert records and verify_chain(records) is None


def test_doctor_reports_the_full_baseline(stockade_home: Path) -> None:
    proc = run_cli(stockade_home, "doctor", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    assert report["ok"] is True
    controls = {f["control"]: f for f in report["findings"]}
    assert controls["end-to-end probe"]["ok"]
    assert controls["seccomp filter"]["ok"] and controls["cgroups"]["ok"]
    assert controls["per-job host uids"]["ok"]
    for name in ("fs.protected_symlinks", "fs.protected_hardlinks", "kernel.kptr_restrict",
                 "kernel.perf_event_paranoid", "kernel.unprivileged_bpf_disabled",
                 "kernel.yama.ptrace_scope"):
        finding = controls[f"sysctl {name}"]  # each says its value and what it means here
        assert finding["detail"].startswith(("= ", "not available")), finding
        assert not finding["required"]


def test_help_documents_the_commands(stockade_home: Path) -> None:
    top = run_cli(stockade_home, "--help").stdout
    for cmd in ("run", "jobs", "show", "logs", "doctor"):
        assert cmd in top
    assert "--workspace" in run_cli(stockade_home, "run", "--help").stdout


# an unprivileged user that can still read the checkout (a clone under /root is 0700), but not
# write anything it does not own: what matters to these tests is that it is not root
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def test_without_root_stockade_refuses_to_run_jobs() -> None:
    home = Path(tempfile.mkdtemp(prefix="stockade-nobody-"))
    os.chown(home, 65534, 65534)
    spec = home / "job.yaml"
    spec.write_text("name: x\nsteps:\n  - {name: a, run: 'true'}\n")
    os.chown(spec, 65534, 65534)
    as_nobody = AS_NOBODY
    env = cli_env(home / "state", STOCKADE_RUNTIME_DIR=str(home / "run"))
    # migrated by root first: Alembic checks its scripts with access(2), which ignores the
    # capability that lets nobody read a checkout under /root
    assert run_cli(home / "state", "jobs").returncode == 0
    for path in (home / "state").rglob("*"):
        os.chown(path, 65534, 65534)
    os.chown(home / "state", 65534, 65534)
    run = subprocess.run([*as_nobody, STOCKADE, "run", str(spec), "--workspace", str(home),
                          "--json"], capture_output=True, text=True, env=env, cwd=home)
    assert run.returncode == 4, run.stderr
    assert "must run as root" in json.loads(run.stdout)["error"]
    doctor = subprocess.run([*as_nobody, STOCKADE, "doctor"], capture_output=True, text=True,
                            env=env, cwd=home)
    assert doctor.returncode == 4
    assert "FAIL running as root" in doctor.stdout
    assert "cannot run jobs with the full hardening baseline" in doctor.stdout
    shutil.rmtree(home)


def test_an_inaccessible_state_directory_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    env = cli_env(private / "home")
    proc = subprocess.run([*AS_NOBODY, STOCKADE, "jobs"], capture_output=True, text=True,
                          env=env, cwd="/")
    assert proc.returncode == 2
    assert "hint: set STOCKADE_HOME to a writable directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_audit_verify_detects_tampering(run_job, tmp_path: Path) -> None:
    home = tmp_path / "audit-home"
    spec = tmp_path / "a.yaml"
    spec.write_text("name: audited\nsteps:\n  - {name: a, run: 'true'}\n")
    assert run_cli(home, "run", str(spec), "--workspace", str(tmp_path)).returncode == 0
    ok = run_cli(home, "audit", "verify")
    assert ok.returncode == 0 and "audit trail intact" in ok.stdout
    listed = json.loads(run_cli(home, "audit", "list", "--json").stdout)
    assert isinstance(json.loads(run_cli(home, "jobs", "--json").stdout), list)  # one shape
    assert [e["action"] for e in listed] == ["job.admitted", "job.claimed", "job.succeeded"]
    db = sqlite3.connect(home / "stockade.db")
    db.execute("DROP TRIGGER audit_events_no_update")  # what an attacker with the file can do
    db.execute("UPDATE audit_events SET action = 'job.failed' WHERE action = 'job.succeeded'")
    db.commit()
    broken = run_cli(home, "audit", "verify")
    assert broken.returncode == 1 and "BROKEN at event 3 of 3" in broken.stderr


def test_validate_reports_every_file(stockade_home: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("name: g\nsteps:\n  - {name: a, run: 'true', timeout: 90s}\n")
    bad.write_text("name: b\nsteps: []\n")
    both = run_cli(stockade_home, "validate", str(good), str(bad))
    assert both.returncode == 2
    assert "good.yaml: valid (g, 1 steps)" in both.stdout
    assert "bad.yaml: invalid job spec" in both.stderr and "at least one step" in both.stderr
    normalised = json.loads(run_cli(stockade_home, "validate", "--json", str(good)).stdout)
    assert normalised["steps"][0]["timeout"] == 90
    assert normalised["resources"]["memory"] == 2 << 30
