"""The host guard: canaries a hostile job must not reach, and checks that nothing is left.

Every containment test runs its probe as a real job through ``stockade run`` and then asserts,
besides what the probe reported from inside, that the host is unaffected: the canary file was
not read or changed, the host process is unseen and alive, the loopback listeners were never
reached, the hostname is unchanged, no process of the job's host uid survives, no cgroup, mount or
directory of the job remains, and no sandboxed process ever ran as host root.
"""

from __future__ import annotations

import glob
import os
import secrets
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.config import Settings
from stockade.sandbox.uids import parse_range
from tests.conftest import CLI_SETTINGS, JobRun, job_cgroups, job_dir
from tests.support.debian import Built

# the host uids jobs run as (each job its own, see sandbox/uids.py)
UID_POOL = parse_range(Settings(home=Path("/")).uid_pool)
# every probe runs on each backend usable here (runsc is not on Debian 12: see doctor)
BACKENDS = ("bwrap", "oci")
HOST_PID_NS = os.readlink("/proc/self/ns/pid")
HOST_USER_NS = os.readlink("/proc/self/ns/user")




def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on each backend, on ``image: host``; the probes of a module that sets
    ``IMAGE_TOO = True`` also in an image (Debian's Essential packages + python3, built by
    ``stockade image build`` and pulled from a registry on loopback), on bwrap, unless the
    test is marked ``host_image_only`` (it checks what the host's /usr and /etc hold)."""
    if "sandbox_backend" not in metafunc.fixturenames:
        return
    if "job_root" not in metafunc.fixturenames:  # (a test that runs no hostile job)
        metafunc.parametrize("sandbox_backend", BACKENDS, indirect=True)
        return
    combos = [(backend, "host") for backend in BACKENDS]
    if getattr(metafunc.module, "IMAGE_TOO", False) and \
            metafunc.definition.get_closest_marker("host_image_only") is None:
        combos.append(("bwrap", "image"))
    metafunc.parametrize(("sandbox_backend", "job_root"), combos, indirect=True,
                         ids=[b if root == "host" else f"{b}-image" for b, root in combos])


@pytest.fixture(autouse=True)
def sandbox_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The sandbox backend of every ``stockade`` command the test runs."""
    CLI_SETTINGS["STOCKADE_SANDBOX_BACKEND"] = request.param
    yield request.param
    CLI_SETTINGS.clear()


@pytest.fixture
def job_root(request: pytest.FixtureRequest) -> Built | None:
    """The image the hostile job runs in (None: ``image: host``)."""
    if request.param == "host":
        return None
    built: Built = request.getfixturevalue("python_image")
    return built


class Listener:
    """TCP and UDP listeners on 127.0.0.1 that count whatever reaches them."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.tcp = socket.socket()
        self.tcp.bind((address, 0))
        self.tcp.listen(16)
        self.tcp.settimeout(0.2)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, self.port))
        self.udp.settimeout(0.2)
        self.hits = 0
        self._stop = False
        self._threads = [threading.Thread(target=self._accept, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
                self.hits += 1
                conn.close()
            except OSError:
                continue

    def _recv(self) -> None:
        while not self._stop:
            try:
                self.udp.recv(65536)
                self.hits += 1
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join()
        self.tcp.close()
        self.udp.close()


class UidSampler:
    """Samples the host uids of the processes in stockade job cgroups (and the children an
    OCI runtime makes for each step's container) while a job runs, by job id: a test looks
    only at its own job (another installation may run jobs meanwhile).

    runc's own set-up is told apart: in a step's cgroup, a process in the host's pid
    namespace is runc's (``runc init``, ``runc:[0:PARENT]``, ``runc:[1:CHILD]``: rootful, as
    root, before they enter the job's namespaces; no process of a job is ever in the host's
    pid namespace there), and ``runc:[2:INIT]`` runs as the container's root, the job's
    second unprivileged pool uid, then as the job's, until it executes the step. runc joins
    the job's own user namespace (made by the job's uid, not by runc) as host uid 0, with no
    capability outside it: its stage 2, the first process of the step's pid namespace, is
    still host uid 0 there, in that user namespace, until its ``setuid(0)`` makes it the
    container's root; that is runc's own code before anything of the step exists (no process
    of a job can be host uid 0 in its user namespace, where uid 0 maps to a pool uid)."""

    PATTERNS = ("/sys/fs/cgroup/pids/stockade/*/cgroup.procs",
                "/sys/fs/cgroup/pids/stockade/*/*/cgroup.procs",
                "/sys/fs/cgroup/stockade/*/cgroup.procs",
                "/sys/fs/cgroup/stockade/*/*/cgroup.procs")

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}
        self.setup: dict[str, list[int]] = {}  # uids of runc:[2:INIT]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            for pattern in self.PATTERNS:
                for procs in glob.glob(pattern):
                    group = Path(procs).parent
                    step = group.parent.name != "stockade"  # a step's child cgroup
                    job = (group.parent if step else group).name.rsplit("-", 1)[-1]
                    for pid in _read(procs).split():
                        self._sample(job, int(pid), step)

    def _sample(self, job: str, pid: int, step: bool) -> None:
        status = _read(f"/proc/{pid}/status")
        uid = _status_uid(status)
        if uid is None or (step and _pid_ns(pid) in (HOST_PID_NS, "")):
            return  # the runtime's set-up, before it enters the job's namespaces (or gone)
        if step and _runc_entering(pid, status):
            return  # runc's stage 2 in the job's user namespace, before its setuid(0)
        name = next((line.split(None, 1)[-1] for line in status.splitlines()
                     if line.startswith("Name:")), "")
        bucket = self.setup if name == "runc:[2:INIT]" else self.seen
        bucket.setdefault(job, []).append(uid)

    def uids(self, job: str) -> list[int]:
        """The host uids seen in ``job``'s cgroups."""
        return self.seen.get(job, [])

    def setup_uids(self, job: str) -> list[int]:
        """The host uids ``job``'s runtime set-up ran as inside its namespaces."""
        return self.setup.get(job, [])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _host_uid(pid: int) -> int | None:
    return _status_uid(_read(f"/proc/{pid}/status"))


def _status_uid(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return min(int(x) for x in line.split()[1:])
    return None


def _runc_entering(pid: int, status: str) -> bool:
    """Whether ``pid`` is runc's stage 2 as it joined the job's user namespace: named by
    runc (``runc:[1:CHILD]`` until it renames itself), host uid 0 throughout, pid 1 of the
    step's pid namespace, in a user namespace other than the host's."""
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].split()
              for line in status.splitlines() if ":" in line}
    try:
        user_ns = os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return False
    return (fields.get("Name", [""])[0] in ("runc:[1:CHILD]", "runc:[2:INIT]")
            and fields.get("Uid") == ["0"] * 4 and fields.get("NSpid", [""])[-1] == "1"
            and user_ns not in (HOST_USER_NS, ""))


def _pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def job_processes(run: JobRun) -> list[int]:
    """Host processes still running as the job's own host uid."""
    uid = run.result["host_uid"]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _host_uid(int(entry)) == uid:
            found.append(int(entry))
    return found


class HostGuard:
    """Everything a hostile job might try to reach, and the checks that it did not."""

    def __init__(self) -> None:
        self.token = "CANARY-" + secrets.token_hex(16)
        self.canary = Path("/root") / f"stockade-canary-{secrets.token_hex(4)}"
        self.canary.write_text(self.token + "\n")
        self.canary.chmod(0o644)  # world-readable on purpose: only the sandbox may stop a read
        self.victim = subprocess.Popen(["sleep", "3600"])
        self.listener = Listener()
        self.hostname = socket.gethostname()
        self.sampler = UidSampler()

    @property
    def env(self) -> dict[str, str]:
        """What the attacker knows about the host, handed to the job in its spec."""
        return {"CANARY": str(self.canary), "HOST_PID": str(self.victim.pid),
                "PORT": str(self.listener.port)}

    def spec_env(self, extra: dict[str, str] | None = None) -> str:
        """The ``env:`` line of a spec carrying :attr:`env` (and ``extra``)."""
        env = {**self.env, **(extra or {})}
        return "env: {" + ", ".join(f'{k}: "{v}"' for k, v in env.items()) + "}\n"

    def assert_unaffected(self, run: JobRun) -> None:
        """The host-side half of every containment test."""
        job = run.result.get("job_id", "")
        assert job, f"no result: rc={run.rc} stderr={run.stderr[-2000:]}"
        texts = [run.stdout, run.stderr, run.log]
        art_dir = run.home / "artifacts" / job
        if art_dir.exists():
            texts += [p.read_text(errors="replace") for p in art_dir.rglob("*") if p.is_file()]
        assert not any(self.token in t for t in texts), "the host canary was read"
        assert self.canary.read_text() == self.token + "\n", "the host canary was changed"
        assert self.victim.poll() is None, "the host process was killed"
        assert self.listener.hits == 0, "a host loopback listener was reached"
        assert socket.gethostname() == self.hostname, "the host hostname changed"
        uids, setup = self.sampler.uids(job), self.sampler.setup_uids(job)
        assert 0 not in uids + setup, "a sandboxed process ran as host root"
        others = set(uids) - {run.result.get("host_uid")}
        if CLI_SETTINGS.get("STOCKADE_SANDBOX_BACKEND") == "oci":
            # runc's init runs as the container's root (the job's second pool uid) inside
            # the job's namespaces until it executes the step; a step can never become it
            others -= set(setup)
            assert len(others) <= 1 and others <= set(UID_POOL), others
            others = set()
        assert not others, others
        assert set(setup) <= set(UID_POOL), set(setup)  # its root, then the job uid
        assert run.result.get("host_uid") in UID_POOL, run.result.get("host_uid")
        assert job_processes(run) == [], "processes of the job's uid survived"
        assert not job_cgroups(run.home, job), "a job cgroup remains"
        assert not job_dir(run.home, job).exists(), "the job directory remains"
        assert job not in Path("/proc/self/mountinfo").read_text(), "a job mount remains"
        assert "leftovers" not in run.result, run.result.get("leftovers")
        backend = CLI_SETTINGS.get("STOCKADE_SANDBOX_BACKEND", "bwrap")
        assert run.result.get("sandbox", backend) == backend, run.result.get("sandbox")

    def close(self) -> None:
        self.sampler.stop()
        self.listener.close()
        self.victim.kill()
        self.victim.wait()
        self.canary.unlink()


@pytest.fixture
def host() -> Iterator[HostGuard]:
    """A fresh :class:`HostGuard` per test."""
    guard = HostGuard()
    yield guard
    guard.close()


@pytest.fixture
def hostile(run_job: Any, host: HostGuard, job_root: Built | None) -> Any:
    """``hostile(script, **opts)``: run ``script`` as one step (in the image of ``job_root``,
    if any), check the host, return the run."""

    def run(script: str, *, resources: str = "", step: str = "", extra: str = "",
            workspace: Path | None = None, job_env: dict[str, str] | None = None,
            **env: str) -> JobRun:
        body = "\n".join("      " + line for line in textwrap.dedent(script).strip().splitlines())
        if job_root is not None:
            extra = f"image: {job_root.reference}\n{extra}"
            env = {**job_root.env, **env}
        spec = (f"name: hostile\n{host.spec_env(job_env)}{resources}{extra}steps:\n"
                f"  - name: probe\n{step}    run: |\n{body}\n")
        started = time.monotonic()
        result = run_job(spec, workspace=workspace, **env)
        result.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
        host.assert_unaffected(result)
        return result

    return run
