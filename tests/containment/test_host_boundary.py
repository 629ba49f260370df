"""The host boundary: nothing a job chooses reaches a host-side process; each job has its own
host uid; artifacts are read only as the job could read them; /proc tells nothing of the host.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import job_dir
from tests.containment.conftest import UID_POOL

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)

PRELOAD_SOURCE = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("MARKER_PATH");
    if (marker) { int fd = open(marker, O_WRONLY | O_CREAT, 0644); if (fd >= 0) close(fd); }
}
"""


@pytest.fixture
def public_dir() -> Any:
    """A world-writable host directory, as /tmp is."""
    with tempfile.TemporaryDirectory(prefix="stockade-test-") as d:
        os.chmod(d, 0o1777)  # writable by anyone: a host-side job process could plant here
        yield Path(d)


def _host_pid_ns() -> str:
    return os.readlink("/proc/self/ns/pid")


def test_job_env_never_reaches_the_host_loader(hostile, public_dir: Path) -> None:
    """A: LD_PRELOAD / LD_DEBUG_OUTPUT in the spec's env act only inside the sandbox."""
    lib = public_dir / "planted.so"
    source = public_dir / "planted.c"
    source.write_text(PRELOAD_SOURCE)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    lib.chmod(0o755)
    marker = public_dir / "host-side-code-ran"
    debug = Path("/tmp") / f"stockade-ld-debug-{secrets.token_hex(4)}"
    run = hostile("echo STEP-RAN", job_env={
        "LD_PRELOAD": str(lib), "MARKER_PATH": str(marker), "LD_DEBUG": "files",
        "LD_DEBUG_OUTPUT": str(debug), "GCONV_PATH": str(public_dir)})
    assert "STEP-RAN" in run.log
    assert not marker.exists(), "job-chosen LD_PRELOAD code ran in a host process"
    assert not list(Path("/tmp").glob(debug.name + "*")), "LD_DEBUG_OUTPUT wrote a host file"


def _host_side(pids: list[int]) -> list[int]:
    """Those of ``pids`` that run in the host's pid namespace (bwrap itself, helpers)."""
    ns = _host_pid_ns()
    found = []
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                found.append(pid)
        except OSError:
            continue
    return found


def _runtimes() -> list[int]:
    """OCI runtime processes on the host (``runc``, ``runsc``)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() in (
                    "runc", "runsc"):
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_host_side_processes_see_no_job_variable_or_secret(run_job, stockade_home: Path,
                                                            tmp_path: Path) -> None:
    """A/J: bwrap's environ and argv hold neither the job's variables, a secret, nor a host
    path of the job (its options arrive in a memfd)."""
    from tests.conftest import run_cli

    value = "sekrit-" + secrets.token_hex(8)
    src = tmp_path / "v"
    src.write_text(value)
    assert run_cli(stockade_home, "secret", "set", "BOUNDARY_TOKEN", "--from-file",
                   str(src)).returncode == 0
    marker = "job-variable-" + secrets.token_hex(6)
    seen: list[tuple[str, bytes]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            pids = _runtimes()  # an OCI runtime works from outside the job's cgroup
            for procs in [*Path("/sys/fs/cgroup/pids/stockade").glob("*/cgroup.procs"),
                          *Path("/sys/fs/cgroup/pids/stockade").glob("*/*/cgroup.procs")]:
                try:
                    pids += [int(p) for p in procs.read_text().split()]
                except OSError:
                    continue
            for pid in _host_side(pids):
                for name in ("environ", "cmdline"):
                    try:
                        seen.append((name, Path(f"/proc/{pid}/{name}").read_bytes()))
                    except OSError:
                        continue

    # on oci the host side is runc, alive for a few tens of milliseconds of the job's start:
    # a loaded machine can starve the sampler through all of it, so the job runs again
    # (three times at most) until a host-side process was sampled
    for _ in range(3):
        stop.clear()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            run = run_job(f"name: env-probe\nenv: {{MARKER: {marker}}}\n"
                          "secrets: [BOUNDARY_TOKEN]\n"
                          "steps:\n  - {name: a, run: 'sleep 2; echo [$MARKER]'}\n")
        finally:
            stop.set()
            sampler.join()
        if seen:
            break
    assert run.rc == 0, run.result
    assert f"[{marker}]" in run.log  # the variable reached the step
    assert seen, "no host-side process of the job was sampled"
    blob = b"\n".join(text for _, text in seen)
    assert marker.encode() not in blob and value.encode() not in blob
    argv = b"\n".join(text for name, text in seen if name == "cmdline")
    assert bytes(job_dir(run.home, run.result["job_id"])) not in argv
    environ = [var for name, text in seen if name == "environ" for var in text.split(b"\0")]
    # runc hands its own init the state directory (in the job's root-only bundle) in
    # _LIBCONTAINER_STATEDIR; nothing else of the job's may be in a host environment
    assert not [var for var in environ if bytes(job_dir(run.home, run.result["job_id"])) in var
                and not var.startswith(b"_LIBCONTAINER_STATEDIR=")], environ
    assert b"--bind" not in blob


def test_proc_tells_nothing_of_the_host(hostile) -> None:
    """J: bwrap's argv, the boot arguments and kernel symbols are not visible inside."""
    run = hostile("""
        tr '\\0' ' ' < /proc/1/cmdline; echo
        echo "cmdline=[$(cat /proc/cmdline 2>/dev/null)]"
        echo "kallsyms=[$(head -c 64 /proc/kallsyms 2>/dev/null)]"
        echo "keys=[$(cat /proc/keys 2>/dev/null)]"
        echo "boot_id=[$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)]"
        echo "acpi=[$(ls /proc/acpi 2>/dev/null)]"
        echo DONE
    """)
    out = run.output("probe")
    assert "DONE" in out
    assert "--bind" not in out and str(job_dir(run.home, run.result["job_id"])) not in out
    for masked in ("cmdline", "kallsyms", "keys", "boot_id", "acpi"):
        assert f"{masked}=[]" in out, masked
    assert "BOOT_IMAGE" not in out and "root=" not in out


INOTIFY_HOG = """
python3 - <<'PY'
import ctypes, time
libc = ctypes.CDLL(None)
fds = [libc.inotify_init1(0) for _ in range(1024)]
print("HELD", sum(fd >= 0 for fd in fds), flush=True)
time.sleep(12)
PY
"""

INOTIFY_USER = """
sleep 3
python3 -c "import ctypes; print('GOT', ctypes.CDLL(None).inotify_init1(0) >= 0)"
"""


def _holding_inotify(count: int) -> bool:
    """Whether a process of the host holds ``count`` inotify instances or more."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            held = sum(os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
                       for fd in fds)
        except OSError:
            continue
        if held >= count:
            return True
    return False


def test_concurrent_jobs_have_their_own_host_uids(stockade_home: Path, tmp_path: Path) -> None:
    """B: a job exhausting its per-uid inotify instances does not starve another job, and
    the two ran as different unprivileged host uids (oci: the job's user namespace is its own
    uid's, not runc's, so its per-user counts are charged to that uid, never to host root)."""
    from tests.conftest import STOCKADE, cli_env

    procs = []
    for name, script in (("hog", INOTIFY_HOG), ("user", INOTIFY_USER)):
        body = "\n".join("      " + line for line in script.strip().splitlines())
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(f"name: {name}\nsteps:\n  - name: s\n    run: |\n{body}\n")
        ws = tmp_path / f"ws-{name}"
        ws.mkdir()
        procs.append(subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(ws),
                                       "--json"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=cli_env(stockade_home)))
        time.sleep(0.5)
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    deadline = time.monotonic() + 60
    while not _holding_inotify(min(limit, 1024) - 2):
        assert time.monotonic() < deadline and procs[0].poll() is None, "the hog never held"
        time.sleep(0.1)
    # while the hog holds all its uid may have, host root's own count is untouched
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0, f"host root got no inotify instance: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append((json.loads(out.splitlines()[-1]), err))
    (hog, hog_log), (user, user_log) = results
    held = int(hog_log.split("HELD ", 1)[1].split()[0])
    assert held >= min(limit, 1024) - 2  # the hog took everything its uid may have
    assert "GOT True" in user_log, user_log[-2000:]
    assert hog["host_uid"] != user["host_uid"]
    assert hog["host_uid"] in UID_POOL and user["host_uid"] in UID_POOL


def test_artifacts_are_read_with_the_jobs_own_rights(hostile) -> None:
    """C: the collector opens files as the job's uid: what the job made unreadable to itself
    is not collected (root would have read it)."""
    run = hostile("mkdir -p out; echo secret > out/locked; chmod 000 out/locked; "
                  "echo fine > out/open; mkdir out/closed; echo x > out/closed/f; "
                  "chmod 000 out/closed",
                  extra="artifacts: ['out/**']\n")
    assert run.rc == 0, run.result
    assert [a["path"] for a in run.result["artifacts"]] == ["out/open"]
    assert any("out/closed" in r for r in run.result["artifacts_refused"])
