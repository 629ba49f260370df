"""What every backend does per job around its own way of starting a step.

Per job the runner (root) takes a host uid of the job's own from the pool (``uids.py``) and
creates ``<runtime>/<job>/`` (root-owned, traversable by that uid only, already locked:
``orphans.create_locked``) with two size-limited tmpfs mounts owned by it (``ws`` →
``/workspace``, ``tmp`` → ``/tmp``; both persist across steps and count against the job's
memory limit), an image's tree seen read-only at ``rootfs`` (jobs on images), the identity
token's directory, the job's own network namespace with the egress proxy's listener in it
(``netns.py``) and the job's cgroup. A backend (``bwrap.py``, ``oci.py``) adds how a step is
started; streaming its output, timeouts, kill, quiesce and a teardown that verifies nothing is
left are the same for all.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.config import Settings, installation_id
from stockade.errors import SandboxError
from stockade.sandbox import image_root, mounts, orphans, reaper, rootfs, uids
from stockade.sandbox.cgroups import JobCgroup, Limits, MigrationWarmer
from stockade.sandbox.interface import OutputSink, SandboxRequest, WorkspaceCopy
from stockade.sandbox.plumbing import PROXY_PORT, PROXY_URL, SEE_LOG, readable

if TYPE_CHECKING:
    import socket

    from stockade.sandbox.netns import JobNetwork

SCRIPT_PATH = "/run/stockade/step.sh"
SECRETS_DIR = "/run/secrets"
IDENTITY_DIR = "/run/stockade/identity"
SHM_BYTES = 64 * 1024 * 1024
SIGNAL_POLL_S = 0.5
# the whole environment of every host-side process the runner starts: the dynamic loader of
# a host process must never see a job's LD_PRELOAD, LD_AUDIT, GCONV_PATH, ...
HOST_ENV: dict[str, str] = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class JobBackend:
    """What backends share: this installation's places, the uid pool, the synthetic /etc, the
    orphan reaper. Cheap to construct; heavy work happens once, lazily."""

    name = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime_dir = Path(settings.runtime_dir)
        # this installation's own part of the runtime directory and of the cgroup tree
        self.installation = installation_id(settings.home)
        self.jobs_dir = self.runtime_dir / self.installation
        self.cgroup_prefix = f"{self.installation}-"
        self._etc: Path | None = None
        self.warmer = MigrationWarmer()  # one for all the jobs of this runner

    def warm(self) -> None:
        """A job is coming: make its first step's move into its cgroup wait for nothing
        (cgroups.MigrationWarmer)."""
        self.warmer.hint()

    def uid_pool(self) -> range:
        """The operator's range of host uids for jobs (one per running job)."""
        return uids.parse_range(self.settings.uid_pool)

    def etc_dir(self) -> Path:
        """The synthetic /etc, with the host's CA store: built once, and again when the
        host's copy changes (checked with a few stats per call)."""
        if self._etc is None:
            self.ensure_runtime_dir()
        self._etc = rootfs.synthetic_etc(self.jobs_dir,
                                         tls_extra_ca_file=self.settings.tls_extra_ca_file)
        return self._etc

    def ensure_runtime_dir(self) -> None:
        """Create this installation's runtime directory (0711) with its marker."""
        try:
            for d in (self.runtime_dir, self.jobs_dir):
                d.mkdir(mode=0o711, parents=True, exist_ok=True)
                os.chmod(d, 0o711)
            orphans.mark(self.jobs_dir, self.installation, self.settings.home)
        except OSError as e:
            raise SandboxError(f"cannot create {self.runtime_dir}: {e.strerror}",
                               hint="run stockade as root or set STOCKADE_RUNTIME_DIR") from e

    def reap_orphans(self, ours: Callable[[str], bool]) -> list[str]:
        """Tear down what this installation's runners that died left behind; return the job
        ids cleaned up. Only entries in the installation's own runtime directory (carrying its
        marker) or cgroups with its prefix are considered, and only jobs ``ours`` confirms
        (recorded in this installation's database). What any backend made is found there."""
        if os.geteuid() != 0 or not orphans.marked(self.jobs_dir, self.installation):
            return []
        return orphans.reap_orphans(self.jobs_dir, self.settings.cgroup_name,
                                    self.cgroup_prefix, ours)

    def start(self, sandbox: PreparedJob) -> None:
        """Set ``sandbox`` up (as root, the runner a child subreaper); torn down if it fails."""
        if os.geteuid() != 0:
            raise SandboxError(
                "stockade must run as root to confine jobs (cgroup limits, per-job "
                "unprivileged uids)", hint="run it with sudo, or see stockade doctor")
        reaper.become_subreaper()
        try:
            sandbox.setup(self.uid_pool())
        except BaseException:
            sandbox.teardown()
            raise


class PreparedJob:
    """One job's prepared sandbox, less how its steps start (see the subclasses)."""

    def __init__(self, backend: JobBackend, request: SandboxRequest) -> None:
        self.backend = backend
        self.request = request
        self._uid: uids.UidLease | None = None
        self.job_dir = backend.jobs_dir / request.job_id
        self.cgroup = JobCgroup(backend.cgroup_prefix + request.job_id,
                                backend.settings.cgroup_name)
        self._mounted: list[Path] = []
        self._lock: int | None = None
        self._network: JobNetwork | None = None  # the job's own (jobs with egress)
        self._proc: subprocess.Popen[bytes] | None = None
        self._killed = False
        self._etc: Path | None = None  # an image's /etc (image host: the backend's)
        self.workspace_copy: WorkspaceCopy | None = None
        self._warming = False  # holds the backend's warmer until its first step started
        bash = _bash(request.rootfs)
        self._bash = bash is not None
        self._shell = [bash, "-e", "-o", "pipefail"] if bash else ["/bin/sh", "-e"]

    @property
    def host_uid(self) -> int:
        """The job's own unprivileged host uid (and gid)."""
        assert self._uid is not None, "the sandbox is not set up"
        return self._uid.uid

    @property
    def workspace(self) -> Path:
        """The host path of the job's workspace tmpfs."""
        return self.job_dir / "ws"

    @property
    def egress_listener(self) -> socket.socket | None:
        """The proxy's listening socket, on 127.0.0.1:3128 in the job's own network
        namespace: connectable from the job's loopback only."""
        return self._network.listener if self._network is not None else None

    @property
    def proxy_url(self) -> str | None:
        """The proxy's address inside the sandbox."""
        return PROXY_URL if self.request.egress else None

    @property
    def identity_token_path(self) -> str | None:
        """The token file inside the sandbox."""
        return f"{IDENTITY_DIR}/token" if self.request.identity else None

    def publish_identity_token(self, token: str) -> None:
        """Write the token (0400, the job's uid) and rename it into place."""
        directory = self.job_dir / "identity"
        tmp = directory / ".token.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o400)
        with os.fdopen(fd, "w") as f:
            os.fchown(f.fileno(), self.host_uid, self.host_uid)
            f.write(token)
        os.replace(tmp, directory / "token")

    def setup(self, pool: range) -> None:
        """Take a host uid, mount the tmpfs, copy the workspace, create the cgroup."""
        from stockade.sandbox.workspace import copy_workspace

        r = self.request
        self.backend.warmer.hold()
        self._warming = True
        self.backend.etc_dir()
        if r.rootfs is not None:
            self._etc = image_root.image_etc(r.rootfs, self.backend.jobs_dir)
        try:
            self._uid = uids.allocate(pool)
            # root-owned, traversable only by the job's own uid (its group): nothing of one
            # job is reachable by another's, and the job cannot rename what root later uses
            self._lock = orphans.create_locked(self.job_dir, self.host_uid)
            if r.rootfs is not None:  # the image's root-only tree, seen read-only here
                tree = r.rootfs
                self.mount_dir("rootfs", lambda point: mounts.bind_read_only(tree, point))
            for name, size in (("ws", r.workspace_bytes), ("tmp", r.tmp_bytes)):
                self.mount_dir(name, functools.partial(_tmpfs, size=size, uid=self.host_uid))
            if r.identity:
                (self.job_dir / "identity").mkdir(mode=0o500)
                os.chown(self.job_dir / "identity", self.host_uid, self.host_uid)
            self.setup_runtime(pool)
        except OSError as e:
            raise SandboxError(f"cannot prepare {self.job_dir}: {e}",
                               hint="run stockade as root; see stockade doctor") from e
        self.workspace_copy = None if r.workspace_src is None else copy_workspace(
            r.workspace_src, self.workspace, self.host_uid, self.host_uid, r.workspace_bytes)
        try:
            self.finish_runtime()
            if r.egress:
                self._network = self.job_network()
        except OSError as e:
            raise SandboxError(f"cannot prepare {self.job_dir}: {e}",
                               hint="run stockade as root; see stockade doctor") from e
        # last: it waits for the kernel's cgroup lock, which the warmer may hold meanwhile
        self.cgroup.create(Limits(memory_bytes=r.memory_bytes, pids=r.pids, cpus=r.cpus))

    def mount_dir(self, name: str, mount: Callable[[Path], None]) -> Path:
        """Make ``<job>/<name>`` (0700) and mount something on it (unmounted at teardown)."""
        point = self.job_dir / name
        point.mkdir(mode=0o700)
        mount(point)
        self._mounted.append(point)
        return point

    def setup_runtime(self, pool: range) -> None:
        """What the backend itself needs per job (nothing by default); what takes a while
        may go on while the workspace is copied, until :meth:`finish_runtime`."""

    def finish_runtime(self) -> None:
        """The rest of :meth:`setup_runtime`, once the workspace is copied."""

    def job_network(self) -> JobNetwork:
        """The job's network namespace with the proxy's listener (a new one by default)."""
        from stockade.sandbox.netns import JobNetwork  # (socket and threads: jobs with egress)

        return JobNetwork(PROXY_PORT)

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a host process for a step, in the job's network namespace if it has one,
        with the fixed host environment and its output on one pipe."""
        popen = subprocess.Popen if self._network is None else self._network.popen
        kwargs.setdefault("cwd", "/")
        try:
            self._proc = popen(argv, env=HOST_ENV, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, **kwargs)
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxError(f"cannot start {os.path.basename(argv[0])}: {e}") from e
        finally:
            if self.warm_until_spawned:
                self.cool()
        return self._proc

    warm_until_spawned = True  # (else the backend calls cool() once its step started)

    def cool(self) -> None:
        """Let the backend's warmer go: the first step started (or never will)."""
        if self._warming:
            self._warming = False
            self.backend.warmer.release()

    def supervise(self, deadline: float, sink: OutputSink) -> tuple[bool, int]:
        """Stream the started process's output to ``sink`` until EOF, then wait for it, killing
        the job at ``deadline``: ``(timed out, its exit status)``."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        timed_out = self.pump(proc.stdout.fileno(), sink, deadline)
        proc.stdout.close()
        try:  # the step may have closed its output and still be running
            returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            returncode = proc.wait()
        return timed_out, returncode

    def pump(self, fd: int, sink: OutputSink, deadline: float) -> bool:
        """Copy output to ``sink`` until EOF; kill the job at ``deadline``. True if it timed out."""
        timed_out = False
        while True:
            # never wait long: a signal (SIGTERM, SIGINT) delivered to another thread of the
            # runner is handled by the main thread only once it runs again
            left = deadline - time.monotonic()
            wait = SIGNAL_POLL_S if timed_out else max(0.0, min(left, SIGNAL_POLL_S))
            if not readable(fd, wait):
                if not timed_out and time.monotonic() >= deadline:
                    timed_out = True
                    self.kill()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return timed_out
            sink(chunk)

    def quiesce(self) -> None:
        """Kill every process of the job and verify that none is left (SandboxError if one
        is): the runner reads what the job wrote only once nothing of the job can change it."""
        self.kill()
        if self.cgroup.pids():
            raise SandboxError(f"processes of job {self.request.job_id} survived being killed; "
                               "its workspace is not collected", hint="see stockade doctor")

    def kill(self) -> None:
        """Kill every process of the job: the cgroup first, then the step's host process."""
        self._killed = True
        self.cgroup.kill_all(spare=(self._proc.pid,) if self._proc else ())
        if self._proc and self._proc.poll() is None:
            self._proc.kill()

    def memory_peak(self) -> int:
        """The job's peak memory use (bytes)."""
        return self.cgroup.memory_peak()

    def teardown(self) -> list[str]:
        """Kill, unmount, remove; verify nothing of the job is left and report what is."""
        self.cool()
        leftovers = self.cgroup.remove()
        if self._network is not None:
            self._network.close()
            self._network = None
        for point in reversed(self._mounted):
            try:
                mounts.unmount(point)
            except OSError as e:
                leftovers.append(f"cannot unmount {point}: {e.strerror}")
        self._mounted = []
        leftovers += [f"mount left behind: {m}" for m in mounts.mounts_under(self.job_dir)]
        if not leftovers:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            shutil.rmtree(self.job_dir, ignore_errors=True)
            if self.job_dir.exists():
                leftovers.append(f"directory left behind: {self.job_dir}")
        if not leftovers:
            # with leftovers the uids stay locked until this runner exits; after that the
            # pool still skips them while any process of them is alive
            self.release_uids()
        return leftovers

    def release_uids(self) -> None:
        """Give the job's host uid back to the pool."""
        if self._uid is not None:
            self._uid.release()


def not_started(runtime: str, returncode: int) -> SandboxError:
    """A step's runtime (bwrap, runc) that exited without starting the step."""
    return SandboxError(f"{runtime} could not start the step (exit {returncode}){SEE_LOG}",
                        hint="run stockade doctor")


def _tmpfs(point: Path, size: int, uid: int) -> None:
    mounts.mount_tmpfs(point, size, uid, uid)


def _bash(rootfs: Path | None) -> str | None:
    """Where the job's root has bash (None: only ``/bin/sh``)."""
    if rootfs is None:
        return "/usr/bin/bash" if Path("/usr/bin/bash").exists() else None
    return next((p for p in ("/usr/bin/bash", "/bin/bash") if image_root.has(rootfs, p)), None)
