"""The bubblewrap backend: one hardened ``bwrap`` per step inside one per-job cgroup.

Per job the runner (root) takes a host uid of the job's own from the pool (``uids.py``) and
creates ``<runtime>/<job>/`` (root-owned, traversable by that uid only) with two size-limited
tmpfs mounts owned by it (``ws`` → ``/workspace``, ``tmp`` → ``/tmp``; both persist across steps
and count against the job's memory limit) and the job's cgroup. Per step it starts bwrap as
that uid with a fixed environment and its options in a memfd (``--args``), and bwrap enters
the cgroup first (see ``cgroups.py``). Inside: fresh user/pid/net/ipc/uts/mount/cgroup
namespaces (with egress, the network namespace is the job's own, made by the runner with the
proxy's listener in it: ``netns.py``), uid 1000, no capabilities, no_new_privs, the seccomp
filter, read-only root (host ``/usr`` + synthetic ``/etc``, or an image's tree), a fresh
``/proc``, a minimal read-only ``/dev``, no core dumps. When the step's shell exits, its pid
namespace dies with it.
"""

from __future__ import annotations

import os
import resource
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.config import Settings, installation_id
from stockade.errors import SandboxError
from stockade.sandbox import image_root, mounts, orphans, reaper, rootfs, seccomp, uids
from stockade.sandbox.cgroups import JobCgroup, Limits
from stockade.sandbox.interface import Finding, OutputSink, SandboxRequest, StepExit, StepRun
from stockade.sandbox.netns import JobNetwork
from stockade.sandbox.plumbing import (
    ERR_TRAP,
    FAILED_FILE,
    MASKED_PROC,
    MASKED_PROC_DIRS,
    PROXY_PORT,
    PROXY_URL,
    TRAP_PATH,
    memfd,
    read_failed_at,
    read_status,
)
from stockade.sandbox.workspace import copy_workspace

if TYPE_CHECKING:
    import socket

SCRIPT_PATH = "/run/stockade/step.sh"
SECRETS_DIR = "/run/secrets"
IDENTITY_DIR = "/run/stockade/identity"
SHM_BYTES = 64 * 1024 * 1024
SIGNAL_POLL_S = 0.5
# the whole environment of every host-side process the runner starts: the dynamic loader of
# a host process must never see a job's LD_PRELOAD, LD_AUDIT, GCONV_PATH, ...
HOST_ENV: dict[str, str] = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
class BwrapBackend:
    """Prepares bubblewrap sandboxes; cheap to construct, heavy work happens once, lazily."""

    name = "bwrap"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime_dir = Path(settings.runtime_dir)
        # this installation's own part of the runtime directory and of the cgroup tree
        self.installation = installation_id(settings.home)
        self.jobs_dir = self.runtime_dir / self.installation
        self.cgroup_prefix = f"{self.installation}-"
        self._bpf: bytes | None = None
        self._etc: Path | None = None
        self._proc_masks: list[str] | None = None

    def bwrap_path(self) -> str:
        """The bwrap binary; SandboxError if it is not installed."""
        path = shutil.which("bwrap", path="/usr/bin:/usr/local/bin:/bin")
        if not path:
            raise SandboxError("bubblewrap (bwrap) is not installed",
                               hint="apt-get install bubblewrap, or run make demo")
        return path

    def uid_pool(self) -> range:
        """The operator's range of host uids for jobs (one per running job)."""
        return uids.parse_range(self.settings.uid_pool)

    def seccomp_bpf(self) -> bytes:
        """The compiled seccomp filter (cached)."""
        if self._bpf is None:
            self._bpf = seccomp.load_bpf(self.settings.cache_dir)
        return self._bpf

    def etc_dir(self) -> Path:
        """The synthetic /etc, with the host's CA store: built once, and again when the
        host's copy changes (checked with a few stats per call)."""
        if self._etc is None:
            self._ensure_runtime_dir()
        self._etc = rootfs.synthetic_etc(self.jobs_dir,
                                         tls_extra_ca_file=self.settings.tls_extra_ca_file)
        return self._etc

    def proc_masks(self) -> list[str]:
        """bwrap options covering the host-revealing ``/proc`` entries this kernel has (the
        same for every step: looked up once)."""
        if self._proc_masks is None:
            masks = [arg for path in MASKED_PROC if os.path.exists(path)
                     for arg in ("--ro-bind", "/dev/null", path)]
            masks += [arg for path in MASKED_PROC_DIRS if os.path.isdir(path)
                      for arg in ("--perms", "0555", "--tmpfs", path, "--remount-ro", path)]
            self._proc_masks = masks
        return self._proc_masks

    def _ensure_runtime_dir(self) -> None:
        try:
            for d in (self.runtime_dir, self.jobs_dir):
                d.mkdir(mode=0o711, parents=True, exist_ok=True)
                os.chmod(d, 0o711)
            orphans.mark(self.jobs_dir, self.installation, self.settings.home)
        except OSError as e:
            raise SandboxError(f"cannot create {self.runtime_dir}: {e.strerror}",
                               hint="run stockade as root or set STOCKADE_RUNTIME_DIR") from e

    def check(self) -> list[Finding]:
        """Host checks for ``stockade doctor`` (see ``checks.py``)."""
        from stockade.sandbox.checks import check_host

        return check_host(self)

    def reap_orphans(self, ours: Callable[[str], bool]) -> list[str]:
        """Tear down what this installation's runners that died left behind; return the job
        ids cleaned up. Only entries in the installation's own runtime directory (carrying its
        marker) or cgroups with its prefix are considered, and only jobs ``ours`` confirms
        (recorded in this installation's database)."""
        if os.geteuid() != 0 or not orphans.marked(self.jobs_dir, self.installation):
            return []
        return orphans.reap_orphans(self.jobs_dir, self.settings.cgroup_name,
                                    self.cgroup_prefix, ours)

    def prepare(self, request: SandboxRequest) -> BwrapSandbox:
        """Create the job's tmpfs mounts, workspace copy and cgroup."""
        if os.geteuid() != 0:
            raise SandboxError(
                "stockade must run as root to confine jobs (cgroup limits, per-job "
                "unprivileged uids)", hint="run it with sudo, or see stockade doctor")
        reaper.become_subreaper()
        sandbox = BwrapSandbox(self, request, self.bwrap_path())
        try:
            sandbox.setup(self.uid_pool())
        except BaseException:
            sandbox.teardown()
            raise
        return sandbox


class BwrapSandbox:
    """One job's prepared bubblewrap sandbox."""

    def __init__(self, backend: BwrapBackend, request: SandboxRequest, bwrap: str) -> None:
        self.backend = backend
        self.request = request
        self._uid: uids.UidLease | None = None
        self.bwrap = bwrap
        self.job_dir = backend.jobs_dir / request.job_id
        self.cgroup = JobCgroup(backend.cgroup_prefix + request.job_id,
                                backend.settings.cgroup_name)
        self._mounted: list[Path] = []
        self._lock: int | None = None
        self._network: JobNetwork | None = None  # the job's own (jobs with egress)
        self._proc: subprocess.Popen[bytes] | None = None
        self._killed = False
        self._etc: Path | None = None  # an image's /etc (image host: the backend's)
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
        r = self.request
        self.backend.etc_dir()
        if self.request.rootfs is not None:
            self._etc = image_root.image_etc(self.request.rootfs, self.backend.jobs_dir)
        try:
            self._uid = uids.allocate(pool)
            # root-owned, traversable only by the job's own uid (its group): nothing of one
            # job is reachable by another's, and the job cannot rename what root later uses
            self._lock = orphans.create_locked(self.job_dir, self.host_uid)
            if r.rootfs is not None:  # the image's root-only tree, seen read-only here
                point = self.job_dir / "rootfs"
                point.mkdir(mode=0o700)
                mounts.bind_read_only(r.rootfs, point)
                self._mounted.append(point)
            for name, size in (("ws", r.workspace_bytes), ("tmp", r.tmp_bytes)):
                point = self.job_dir / name
                point.mkdir(mode=0o700)
                mounts.mount_tmpfs(point, size, self.host_uid, self.host_uid)
                self._mounted.append(point)
            if self.request.identity:
                (self.job_dir / "identity").mkdir(mode=0o500)
                os.chown(self.job_dir / "identity", self.host_uid, self.host_uid)
            if r.egress:
                self._network = JobNetwork(PROXY_PORT)
        except OSError as e:
            raise SandboxError(f"cannot prepare {self.job_dir}: {e}",
                               hint="run stockade as root; see stockade doctor") from e
        self.workspace_copy = None if r.workspace_src is None else copy_workspace(
            r.workspace_src, self.workspace, self.host_uid, self.host_uid, r.workspace_bytes)
        self.cgroup.create(Limits(memory_bytes=r.memory_bytes, pids=r.pids, cpus=r.cpus))

    def options(self, seccomp_fd: int, script_fd: int, status_fd: int, env: Mapping[str, str],
                secret_fds: Mapping[str, int] | None = None,
                trap_fd: int | None = None) -> list[str]:
        """bwrap's options for one step, handed over in a memfd (``--args``), never in argv:
        no host path, job variable or secret shows in any process list or ``/proc/PID/cmdline``.
        The job's variables reach only the sandboxed command (``--clearenv``/``--setenv``)."""
        root = self._root()
        secrets: list[str] = []
        if secret_fds:
            secrets = ["--dir", SECRETS_DIR]
            for name, fd in secret_fds.items():
                secrets += ["--perms", "0400", "--ro-bind-data", str(fd), f"{SECRETS_DIR}/{name}"]
        masked = self.backend.proc_masks()
        # with egress, the network namespace is the one the step is started in (the job's)
        unshare = (["--unshare-all"] if self._network is None else
                   ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"])
        return [
            *unshare, "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(rootfs.JOB_UID), "--gid", str(rootfs.JOB_GID),
            "--hostname", self.request.job_id,
            *root,
            "--proc", "/proc", *masked,
            "--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev",
            "--bind", str(self.workspace), "/workspace",
            "--bind", str(self.job_dir / "tmp"), "/tmp",
            "--ro-bind-data", str(script_fd), SCRIPT_PATH,
            *(["--ro-bind-data", str(trap_fd), TRAP_PATH] if trap_fd is not None else []),
            *secrets,
            *(["--ro-bind", str(self.job_dir / "identity"), IDENTITY_DIR]
              if self.request.identity else []),
            "--remount-ro", "/",
            "--chdir", "/workspace",
            "--json-status-fd", str(status_fd),
            "--seccomp", str(seccomp_fd),
            "--clearenv",
            *[arg for name, value in env.items() for arg in ("--setenv", name, value)],
        ]

    def _root(self) -> list[str]:
        """The read-only root: the host's ``/usr`` and a synthetic ``/etc`` (image host), or
        the image's tree and its prepared ``/etc`` (see ``image_root.py``)."""
        if self.request.rootfs is not None and self._etc is not None:
            return [*image_root.root_options(self.request.rootfs, self.job_dir / "rootfs"),
                    "--ro-bind", str(self._etc), "/etc"]
        return ["--ro-bind", "/usr", "/usr",
                "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
                "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--ro-bind", str(self.backend.etc_dir()), "/etc"]

    def command(self) -> list[str]:
        """What bwrap runs inside: the step's shell."""
        return [*self._shell, SCRIPT_PATH]

    def run(self, step: StepRun, sink: OutputSink) -> StepExit:
        """Run one step to completion or to its timeout, streaming output to ``sink``."""
        start = time.monotonic()
        self._killed = False
        ooms_before = self.cgroup.oom_kills()
        seccomp_fd = memfd("seccomp", self.backend.seccomp_bpf())
        script_fd = memfd("script", step.script.encode())
        trap_fd = memfd("trap", ERR_TRAP)  # which command failed (bash only)
        env = {**step.env, "BASH_ENV": TRAP_PATH} if self._bash else step.env
        secret_fds = {name: memfd("secret", value) for name, value in step.secret_files.items()}
        status_r, status_w = os.pipe()
        options = self.options(seccomp_fd, script_fd, status_w, env, secret_fds, trap_fd)
        args_fd = memfd("args", b"".join(arg.encode("utf-8", "surrogateescape") + b"\0"
                                         for arg in options))
        passed = (seccomp_fd, script_fd, status_w, args_fd, trap_fd, *secret_fds.values())
        procs_fds = self.cgroup.procs_fds()

        def in_child() -> None:
            for fd in procs_fds:  # runs as the job's uid; the fds were opened by root
                os.write(fd, b"0")
            # no core dumps: a core_pattern pipe helper would run on the host, as root
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        try:
            popen = subprocess.Popen if self._network is None else self._network.popen
            self._proc = popen(
                [self.bwrap, "--args", str(args_fd), "--", *self.command()], env=HOST_ENV,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                user=self.host_uid, group=self.host_uid, extra_groups=[],
                pass_fds=passed, preexec_fn=in_child, start_new_session=True, cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxError(f"cannot start bwrap: {e}") from e
        finally:
            for fd in passed:
                os.close(fd)
        assert self._proc.stdout is not None
        deadline = start + step.timeout
        timed_out = self._pump(self._proc.stdout.fileno(), sink, deadline)
        self._proc.stdout.close()
        try:  # the step may have closed its output and still be running
            returncode = self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            returncode = self._proc.wait()
        status = read_status(status_r)
        if "child-pid" in status:  # bwrap's own init can outlive bwrap by a moment: reap it
            reaper.reap([status["child-pid"]], time.monotonic() + 5)
        if "child-pid" not in status and not (timed_out or self._killed):
            raise SandboxError(f"bwrap could not start the step (exit {returncode}); "
                               "see the log above", hint="run stockade doctor")
        oom = self.cgroup.oom_kills() > ooms_before
        code = status.get("exit-code")
        failed_at = read_failed_at(self.job_dir / "tmp" / FAILED_FILE)
        return StepExit(exit_code=None if (timed_out or self._killed or code is None) else code,
                        timed_out=timed_out, oom_killed=oom,
                        duration_s=time.monotonic() - start,
                        failed_at=failed_at if code else None)

    def _pump(self, fd: int, sink: OutputSink, deadline: float) -> bool:
        """Copy output to ``sink`` until EOF; kill the job at ``deadline``. True if it timed out."""
        timed_out = False
        while True:
            # never wait long: a signal (SIGTERM, SIGINT) delivered to another thread of the
            # runner is handled by the main thread only once it runs again
            left = deadline - time.monotonic()
            wait = SIGNAL_POLL_S if timed_out else max(0.0, min(left, SIGNAL_POLL_S))
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
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
        """Kill every process of the job: the cgroup first, then bwrap itself."""
        self._killed = True
        self.cgroup.kill_all(spare=(self._proc.pid,) if self._proc else ())
        if self._proc and self._proc.poll() is None:
            self._proc.kill()

    def memory_peak(self) -> int:
        """The job's peak memory use (bytes)."""
        return self.cgroup.memory_peak()

    def teardown(self) -> list[str]:
        """Kill, unmount, remove; verify nothing of the job is left and report what is."""
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
        if not leftovers and self._uid is not None:
            # with leftovers the uid stays locked until this runner exits; after that the
            # pool still skips it while any process of it is alive
            self._uid.release()
        return leftovers


def _bash(rootfs: Path | None) -> str | None:
    """Where the job's root has bash (None: only ``/bin/sh``)."""
    if rootfs is None:
        return "/usr/bin/bash" if Path("/usr/bin/bash").exists() else None
    return next((p for p in ("/usr/bin/bash", "/bin/bash") if image_root.has(rootfs, p)), None)

