"""Red-team probes of today's egress path (the runner's own network namespace per job, the
proxy's listener in it): hostile jobs run through ``stockade run`` on every backend, and the
host checked as for every containment probe."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.conftest import STOCKADE, JobRun, cli_env

CHURN_S = 10
CHURN = f"""\
python3 - <<'PY'
import socket, time
end, n = time.monotonic() + {CHURN_S}, 0
while time.monotonic() < end:
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=2)
        s.sendall(b"GET http://10.0.0.1/ HTTP/1.1\\r\\nHost: 10.0.0.1\\r\\n\\r\\n")
        s.recv(100)
        s.close()
        n += 1
    except OSError:
        pass
print("connections", n)
PY
"""


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (every thread of it), None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_job_churning_proxy_connections_cannot_spend_the_runners_cpu(
        stockade_home: Path, tmp_path: Path, host) -> None:
    """The proxy of a job runs in the runner process, outside the job's cgroup. A job that
    only opens, denies and closes connections as fast as it can (cpus: 1) made the runner
    spend ~0.8 of a core on it (8 s of CPU in 10 s here): one job's CPU quota doubled, and
    the runner's other jobs (and its heartbeats) starved on a 2-core host. The runner's work
    for a job must be bounded (DESIGN: the host boundary)."""
    spec = tmp_path / "churn.yaml"
    body = "".join(f"      {line}\n" for line in CHURN.splitlines())
    spec.write_text(f"name: churn\negress: {{mode: block, allow: []}}\nresources: {{cpus: 1}}\n"
                    f"steps:\n  - name: s\n    run: |\n{body}")
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(ws), "--json"],
                            env=cli_env(stockade_home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    spent = 0.0
    while proc.poll() is None:  # (the last sample before it exits)
        spent = _cpu_s(proc.pid) or spent
        time.sleep(0.1)
    out, err = proc.communicate()
    result = json.loads(out.splitlines()[-1])
    run = JobRun(proc.returncode, result, out, err, stockade_home)
    host.assert_unaffected(run)
    assert result["status"] == "succeeded", err + run.log
    made = int(run.log.split("connections ", 1)[1].split()[0])
    assert made > 1000, run.log  # (the churn happened)
    assert spent < 0.3 * CHURN_S, f"the runner spent {spent:.1f} s of CPU on {made} connections"
