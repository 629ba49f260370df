"""Jobs on the ``oci`` backend (runc) end to end: secrets, an ID token, egress and artifacts;
an image; a runner killed mid-step; and how ``isolation: strong`` and ``stockade doctor``
behave where runsc is not usable (Debian 12's runsc cannot run the hardened bundle)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI_SETTINGS, STOCKADE, cli_env, job_cgroups, job_dir, run_cli
from tests.integration.test_image_jobs import PROBE, _spec, image_env, web  # noqa: F401
from tests.support.web import BODY


@pytest.fixture(autouse=True)
def oci() -> Iterator[None]:
    CLI_SETTINGS["STOCKADE_SANDBOX_BACKEND"] = "oci"
    yield
    CLI_SETTINGS.clear()


def nothing_left(home: Path, job_id: str) -> None:
    assert not job_cgroups(home, job_id)  # in every hierarchy, runc's included
    assert not job_dir(home, job_id).exists()
    assert job_id not in Path("/proc/self/mountinfo").read_text()


def test_secrets_id_token_egress_and_artifacts(run_job, stockade_home: Path, tmp_path: Path,
                                               web: int) -> None:  # noqa: F811
    value = "oci-sekrit-" + "7" * 12
    (tmp_path / "v").write_text(value)
    for delivery in ("env", "file"):
        assert run_cli(stockade_home, "secret", "set", f"OCI_{delivery.upper()}",
                       "--from-file", str(tmp_path / "v")).returncode == 0
    spec = f"""name: oci-all
secrets: [OCI_ENV, {{name: OCI_FILE, as: file}}]
id_token: {{aud: "https://vault.example.test"}}
egress: {{mode: block, allow: []}}
artifacts: ["out/**"]
steps:
  - name: a
    run: |
      mkdir -p out
      [ "$OCI_ENV" = "$(cat /run/secrets/OCI_FILE)" ] && echo secret-ok
      stat -c '%a %u' /run/secrets/OCI_FILE
      test -s "$STOCKADE_ID_TOKEN_FILE" && echo token-ok
      curl -sS --max-time 10 --noproxy "" -x "$HTTP_PROXY" http://127.0.0.1:{web}/x >out/fetched
      echo built > out/result
  - name: b
    run: cat out/result; cat /run/secrets/OCI_FILE >/dev/null && echo secret-again
"""
    job = run_job(spec, STOCKADE_EGRESS_INTERNAL_ALLOW=f"127.0.0.1/32:{web}")
    assert job.rc == 0, job.stderr + job.log
    assert job.result["sandbox"] == "oci"
    for word in ("secret-ok", "400 1000", "token-ok", "built", "secret-again"):
        assert word in job.log, (word, job.log)
    assert value not in job.log
    assert sorted(a["path"] for a in job.result["artifacts"]) == ["out/fetched", "out/result"]
    fetched = stockade_home / "artifacts" / job.result["job_id"] / "out" / "fetched"
    assert fetched.read_bytes() == BODY
    assert job.result["egress"]["allowed"] == [f"127.0.0.1:{web}"]
    nothing_left(stockade_home, job.result["job_id"])


OWNERS = r"""
python3 - <<'PY'
import fcntl, os, struct
NS_GET_USERNS, NS_GET_OWNER_UID = 0xB701, 0xB704  # <linux/nsfs.h>
user = os.open("/proc/self/ns/user", os.O_RDONLY)
owner = struct.unpack("I", fcntl.ioctl(user, NS_GET_OWNER_UID, bytes(4)))[0]
net_owner = fcntl.ioctl(os.open("/proc/self/ns/net", os.O_RDONLY), NS_GET_USERNS)
same = os.fstat(net_owner).st_ino == os.fstat(user).st_ino
print(f"userns-owner={owner} uid={os.getuid()} netns-in-userns={same}")
PY
"""


def test_the_jobs_user_namespace_is_its_own_uids(run_job, stockade_home: Path) -> None:
    """The container's user namespace is owned by the job's own host uid, seen inside as the
    job user (one made by runc, as root, shows as the overflow uid 65534), in every step, and
    the job's egress network namespace belongs to it."""
    body = "\n".join("      " + line for line in OWNERS.strip().splitlines())
    spec = ("name: owners\negress: {mode: block, allow: []}\nsteps:\n"
            f"  - name: a\n    run: |\n{body}\n  - name: b\n    run: |\n{body}\n")
    job = run_job(spec)
    assert job.rc == 0, job.stderr + job.log
    assert job.log.count("userns-owner=1000 uid=1000 netns-in-userns=True") == 2, job.log
    nothing_left(stockade_home, job.result["job_id"])


def test_a_job_runs_on_its_image(run_job, image_env: dict[str, str],  # noqa: F811
                                 stockade_home: Path) -> None:
    host = image_env.pop("HOST")
    image_env.pop("DIGEST")
    job = run_job(_spec(f"{host}/test/busybox:1"), **image_env)
    assert job.rc == 0, job.stderr + job.log
    assert job.result["sandbox"] == "oci"
    for expected in ("ID=stockade-test", "no-host-usr", "no-shadow", "read-only-root",
                     "read-only-etc", "escape-dangles", "no-mount", "no-userns", "no-network",
                     "kcore=0"):
        assert expected in job.log, (expected, job.log)
    nothing_left(stockade_home, job.result["job_id"])


def test_a_runner_killed_mid_step_leaves_nothing_after_the_next_run(
        stockade_home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text("name: slow\nsteps:\n  - {name: a, run: 'echo started; sleep 300'}\n")
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(tmp_path), "--json"],
                            env=cli_env(stockade_home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            break
    jobs = json.loads(run_cli(stockade_home, "jobs", "--json").stdout)
    lost = next(j["job_id"] for j in jobs if j["status"] == "running")
    proc.kill()
    proc.wait()
    time.sleep(0.2)
    assert job_cgroups(stockade_home, lost)  # SIGKILL: the container runs on, until reaped
    nxt = tmp_path / "next.yaml"
    nxt.write_text("name: next\nsteps:\n  - {name: a, run: 'true'}\n")
    done = run_cli(stockade_home, "run", str(nxt), "--workspace", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"job {lost} lost its runner" in done.stderr
    nothing_left(stockade_home, lost)
    state = Path("/run/stockade") / (stockade_home / "installation-id").read_text().strip()
    assert not list(state.glob(f"{lost}*"))


def test_strong_isolation_is_refused_where_no_runner_takes_it(run_job) -> None:
    job = run_job("name: strong\nisolation: strong\nsteps:\n  - {name: a, run: 'true'}\n")
    assert job.rc == 3, job.stderr
    assert (job.result["status"], job.result["failure_reason"]) == ("denied", "policy_denied")
    assert "sandbox_backend" in job.result["message"] and "runsc" in job.result["message"]
    assert "'oci'" in job.result["message"]


def test_doctor_reports_every_backend(stockade_home: Path) -> None:
    proc = run_cli(stockade_home, "doctor", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["backend"] == "oci", proc.stdout
    lines = {b["control"]: b for b in report["backends"]}
    assert set(lines) == {"backend bwrap", "backend oci", "backend runsc"}
    assert lines["backend oci"]["ok"] and lines["backend bwrap"]["ok"]
    runsc = lines["backend runsc"]
    if not runsc["ok"]:  # Debian 12's runsc: not usable, and says why and how to fix it
        assert runsc["detail"].startswith("not usable: ") and runsc["remedy"]
        assert not runsc["required"]
