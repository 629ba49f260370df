"""The OCI backends: each step a container of an OCI runtime, ``runc`` (``oci``) or gVisor's
``runsc`` (``runsc``, on its ptrace platform), in the same per-job set-up as bwrap.

The job's host uid, directory, tmpfs mounts, cgroup and network are prepared as for every
backend (``job.py``). On top, per job: a second unprivileged uid of the pool (root of the
container's user namespace: the runtime's own set-up runs as it, the step never does); for
runc, that user namespace itself, made by the job's own host uid (``userns.py``: made by runc,
as root, it would have the kernel charge the job's per-user counts, inotify instances and the
like, to host root) and joined by every step's container, with egress the job's network
namespace inside it; a root-only tmpfs ``<job>/oci`` (the bundle: ``config.json``, the
runtime's state, the step's script and secret files: in memory only, never on disk,
unreachable by the job) and the root's skeleton (``oci_root.py``). Per step the runner writes
the step's files and ``config.json`` (``oci_config.py``) there and runs ``RUNTIME --root
state run --detach --bundle . ID`` as root from that directory (no host path, secret or job
variable in any argv; the runtime's own environment is the fixed host one); as soon as the
runtime returns, ``config.json`` and the secret files are removed (the container keeps its
read-only binds of them). The container lives in a child cgroup of the job's
(``cgroups.step_path``), so the job's limits, OOM count, peak memory and kill cover it; its
init is re-parented to the runner (a child subreaper), which waits for it with a pidfd.
Teardown kills and removes the job's cgroup subtree in every hierarchy, unmounts the bundle
with the runtime's state in it and closes the runner's hold on the job's namespaces: nothing
of a runtime is left, and the reaper finds the same things after a runner died (the
namespaces go with the runner's fds and the job's last process).

Unlike bwrap (``--die-with-parent``), a container does not die with a runner killed by
SIGKILL: it runs on until the reaper (the runner's restart, or the installation's next
command) kills its cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from stockade.config import Settings
from stockade.errors import SandboxError
from stockade.sandbox import image_root, mounts, oci_config, oci_root, uids, userns
from stockade.sandbox.cgroups import Limits
from stockade.sandbox.interface import Finding, OutputSink, SandboxRequest, StepExit, StepRun
from stockade.sandbox.job import (
    HOST_ENV,
    IDENTITY_DIR,
    SCRIPT_PATH,
    SECRETS_DIR,
    SHM_BYTES,
    SIGNAL_POLL_S,
    JobBackend,
    PreparedJob,
    not_started,
)
from stockade.sandbox.plumbing import (
    ERR_TRAP,
    FAILED_FILE,
    PROXY_PORT,
    TRAP_PATH,
    read_failed_at,
    readable,
)

if TYPE_CHECKING:
    from stockade.sandbox.netns import JobNetwork

BUNDLE_BYTES = 64 * 1024 * 1024  # config.json (the env), the script, secret files, state
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"
PRLIMIT = "/usr/bin/prlimit"  # util-linux: sets its own limits, then executes the command


class Runtime(NamedTuple):
    """An OCI runtime: its backend name, binary, Debian package, global options, and whether
    its containers join a user namespace the runner made (else the runtime makes one)."""

    backend: str
    binary: str
    package: str
    options: tuple[str, ...] = ()
    joins_userns: bool = False


RUNC = Runtime("oci", "runc", "runc", joins_userns=True)
# gVisor: its ptrace platform (KVM needs nesting this host's VM lacks), the OCI seccomp
# profile applied inside its kernel too
RUNSC = Runtime("runsc", "runsc", "runsc", ("--platform=ptrace", "--oci-seccomp"))


class OciBackend(JobBackend):
    """Prepares containers of one OCI runtime (``RUNC`` or ``RUNSC``)."""

    def __init__(self, settings: Settings, runtime: Runtime = RUNC) -> None:
        super().__init__(settings)
        self.runtime = runtime
        self.name = runtime.backend

    def runtime_path(self) -> str:
        """The runtime's binary; SandboxError if it is not installed."""
        path = shutil.which(self.runtime.binary, path=SEARCH_PATH)
        if not path:
            raise SandboxError(f"{self.runtime.binary} is not installed",
                               hint=f"apt-get install {self.runtime.package}")
        return path

    def check(self) -> list[Finding]:
        """Host checks for ``stockade doctor`` (see ``checks.py``)."""
        from stockade.sandbox.oci_checks import check_oci

        return check_oci(self)

    def prepare(self, request: SandboxRequest) -> OciSandbox:
        """Create the job's mounts, bundle, workspace copy and cgroup."""
        sandbox = OciSandbox(self, request, self.runtime_path())
        self.start(sandbox)
        return sandbox


class OciSandbox(PreparedJob):
    """One job's containers, one per step."""

    backend: OciBackend
    warm_until_spawned = False  # runc moves its container later: cooled once it started

    def __init__(self, backend: OciBackend, request: SandboxRequest, runtime: str) -> None:
        super().__init__(backend, request)
        self.runtime = runtime
        self.bundle = self.job_dir / "oci"
        self._setup_uid: uids.UidLease | None = None
        self._namespaces: userns.JobNamespaces | None = None
        self._helper: subprocess.Popen[bytes] | None = None  # making the user namespace
        self._skeleton: Path | None = None
        self._root_binds: list[tuple[str, str]] = []
        self._steps = 0

    def setup_runtime(self, pool: range) -> None:
        """The set-up uid, the job's user namespace (runc), the bundle's tmpfs, the root's
        skeleton and binds."""
        self._setup_uid = uids.allocate(pool)
        if self.backend.runtime.joins_userns:  # (it works while the rest is prepared)
            self._helper = userns.start(self.host_uid, self.request.egress, HOST_ENV)
        self.mount_dir("oci", lambda point: mounts.mount_tmpfs(point, BUNDLE_BYTES, 0, 0))
        tree = self.request.rootfs
        if tree is None:
            self._skeleton = oci_root.host_skeleton(self.backend.jobs_dir)
            self._root_binds = [("/usr", "/usr"), (str(self.backend.etc_dir()), "/etc")]
        else:
            assert self._etc is not None
            self._skeleton = oci_root.image_skeleton(self.backend.jobs_dir, tree)
            seen_at = self.job_dir / "rootfs"
            self._root_binds = [(str(seen_at / e.name), f"/{e.name}")
                                for e in image_root.top_entries(tree) if e.link is None]
            self._root_binds.append((str(self._etc), "/etc"))

    def finish_runtime(self) -> None:
        """The job's user namespace from the helper :meth:`setup_runtime` started."""
        helper, self._helper = self._helper, None
        if helper is not None:
            assert self._setup_uid is not None
            self._namespaces = userns.finish(
                helper, oci_config.id_map(self.host_uid, self._setup_uid.uid),
                network=self.request.egress)

    def job_network(self) -> JobNetwork:
        """The job's network namespace: with runc, the one in the job's user namespace."""
        from stockade.sandbox.netns import JobNetwork  # (socket and threads: jobs with egress)

        if self._namespaces is None or self._namespaces.net is None:
            return super().job_network()
        return JobNetwork(PROXY_PORT, join=self._namespaces.net)

    def teardown(self) -> list[str]:
        """Drop the runner's hold on the job's namespaces, then tear down as every backend."""
        if self._helper is not None:  # (set-up failed before it was finished)
            userns.end(self._helper)
            self._helper = None
        if self._namespaces is not None:
            self._namespaces.close()
            self._namespaces = None
        return super().teardown()

    def release_uids(self) -> None:
        """Give both of the job's host uids back to the pool."""
        super().release_uids()
        if self._setup_uid is not None:
            self._setup_uid.release()

    def options(self) -> list[str]:
        """The runtime's global options (its state lives in the bundle's tmpfs)."""
        network = []
        if self.backend.runtime is RUNSC:
            network = ["--network=host" if self._network is not None else "--network=none"]
        return [*self.backend.runtime.options, *network, "--root", "state"]

    def step_config(self, step: StepRun, files: list[tuple[str, str]]) -> oci_config.StepConfig:
        """What the step's ``config.json`` says (see ``oci_config.py``)."""
        assert self._setup_uid is not None and self._skeleton is not None
        r = self.request
        env = {**step.env, "BASH_ENV": TRAP_PATH} if self._bash else dict(step.env)
        return oci_config.StepConfig(
            hostname=r.job_id, root=str(self._skeleton), args=[*self._shell, SCRIPT_PATH],
            env=env, job_uid=self.host_uid, setup_uid=self._setup_uid.uid,
            root_binds=self._root_binds, workspace=str(self.workspace),
            tmp=str(self.job_dir / "tmp"), files=files,
            netns=self._network.path if self._network is not None else None,
            userns=self._namespaces.user_path if self._namespaces is not None else None,
            cgroups_path=self.cgroup.step_path(f"step-{self._steps}"),
            limits=Limits(memory_bytes=r.memory_bytes, pids=r.pids, cpus=r.cpus),
            shm_bytes=SHM_BYTES)

    def _write_files(self, step: StepRun) -> tuple[list[tuple[str, str]], list[Path]]:
        """The step's files in the bundle (the job's uid, 0400): their binds, and the secret
        files (removed once the container has them)."""
        directory = self.bundle / "step"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700)
        binds, secrets = [], []
        named = [("step.sh", step.script.encode(), SCRIPT_PATH)]
        if self._bash:  # which command failed (bash only)
            named.append(("trap.sh", ERR_TRAP, TRAP_PATH))
        named += [(f"secret-{n}", value, f"{SECRETS_DIR}/{name}")
                  for n, (name, value) in enumerate(step.secret_files.items())]
        for file_name, data, inside in named:
            path = directory / file_name
            _write(path, data, self.host_uid)
            binds.append((str(path), inside))
            if inside.startswith(SECRETS_DIR):
                secrets.append(path)
        if self.request.identity:
            binds.append((str(self.job_dir / "identity"), IDENTITY_DIR))
        return binds, secrets

    def run(self, step: StepRun, sink: OutputSink) -> StepExit:
        """Run one step's container to completion or to its timeout, streaming its output."""
        start = time.monotonic()
        deadline = start + step.timeout
        self._killed = False
        self._steps += 1
        ooms_before = self.cgroup.oom_kills()
        binds, secrets = self._write_files(step)
        document = json.dumps(oci_config.config(self.step_config(step, binds)))
        _write(self.bundle / "config.json", document.encode(), 0, mode=0o600)
        container = f"step-{self._steps}"
        # no core dumps: runc cannot set the limit on a container in a user namespace root
        # does not own (see oci_config.py), so runc starts with it and its container inherits
        no_cores = [PRLIMIT, "--core=0:0", "--"] if self.backend.runtime.joins_userns else []
        try:
            self.spawn([*no_cores, self.runtime, *self.options(), "run", "--detach",
                        "--pid-file", "pid", "--bundle", ".", container], cwd=self.bundle)
            started = self._started(deadline)
        finally:
            self.cool()  # (the runtime moved the container into its cgroup by now)
            for path in (self.bundle / "config.json", *secrets):
                path.unlink(missing_ok=True)
        timed_out, returncode = self.supervise(deadline, sink)
        code = None
        if started is not None and not (timed_out or self._killed):
            code, timed_out = self._wait(started, deadline)
        if returncode != 0 and not (timed_out or self._killed):
            raise not_started(self.backend.runtime.binary, returncode)
        oom = self.cgroup.oom_kills() > ooms_before
        failed_at = read_failed_at(self.job_dir / "tmp" / FAILED_FILE)
        shutil.rmtree(self.bundle / "state" / container, ignore_errors=True)
        (self.bundle / "pid").unlink(missing_ok=True)
        return StepExit(exit_code=None if (timed_out or self._killed) else code,
                        timed_out=timed_out, oom_killed=oom,
                        duration_s=time.monotonic() - start,
                        failed_at=failed_at if code else None)

    def _started(self, deadline: float) -> int | None:
        """Wait for the runtime to have started the container; its init's pid (None if it
        did not start)."""
        assert self._proc is not None
        # the runtime's exit seen on a pidfd: Popen.wait(timeout) sleeps in doubling steps
        # (up to 50 ms), which added up to ~30 ms to a step's start
        pidfd = os.pidfd_open(self._proc.pid)
        try:
            while not readable(pidfd, max(0.0, min(deadline - time.monotonic(),
                                                   SIGNAL_POLL_S))):
                if time.monotonic() >= deadline:
                    return None  # supervise kills the job at the deadline
        finally:
            os.close(pidfd)
        self._proc.wait()
        try:
            return int((self.bundle / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait(self, pid: int, deadline: float) -> tuple[int | None, bool]:
        """The step's exit code once the container's init (re-parented to the runner) has
        exited, and whether the deadline came first (then the job is killed)."""
        timed_out = False
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        try:
            while pidfd >= 0:
                left = deadline - time.monotonic()
                if readable(pidfd, max(0.0, min(left, SIGNAL_POLL_S))):
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    self.kill()
                    return None, True
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped already (killed)
            return None, timed_out
        code = os.waitstatus_to_exitcode(status)
        return (code if code >= 0 else 128 - code), timed_out


def _write(path: Path, data: bytes, owner: int, mode: int = 0o400) -> None:
    """Create ``path`` anew with ``data``, owned by ``owner``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchown(fd, owner, owner)
        os.write(fd, data)
    finally:
        os.close(fd)
