"""The bubblewrap backend: one hardened ``bwrap`` per step inside one per-job cgroup.

The job's host uid, directory, tmpfs mounts, cgroup and network are prepared as for every
backend (``job.py``). Per step it starts bwrap as the job's uid with a fixed environment and
its options in a memfd (``--args``), and bwrap enters the cgroup first (see ``cgroups.py``).
Inside: fresh user/pid/net/ipc/uts/mount/cgroup namespaces (with egress, the network namespace
is the job's own, made by the runner with the proxy's listener in it: ``netns.py``), uid 1000,
no capabilities, no_new_privs, the seccomp filter, read-only root (host ``/usr`` + synthetic
``/etc``, or an image's tree), a fresh ``/proc``, a minimal read-only ``/dev``, no core dumps.
When the step's shell exits, its pid namespace dies with it.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections.abc import Mapping

from stockade.config import Settings
from stockade.errors import SandboxError
from stockade.sandbox import image_root, reaper, rootfs, seccomp
from stockade.sandbox.interface import Finding, OutputSink, SandboxRequest, StepExit, StepRun
from stockade.sandbox.job import (
    IDENTITY_DIR,
    SCRIPT_PATH,
    SECRETS_DIR,
    SHM_BYTES,
    JobBackend,
    PreparedJob,
    not_started,
)
from stockade.sandbox.plumbing import (
    ERR_TRAP,
    FAILED_FILE,
    MASKED_PROC,
    MASKED_PROC_DIRS,
    TRAP_PATH,
    memfd,
    read_failed_at,
    read_status,
)


class BwrapBackend(JobBackend):
    """Prepares bubblewrap sandboxes; cheap to construct, heavy work happens once, lazily."""

    name = "bwrap"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._bpf: bytes | None = None
        self._proc_masks: list[str] | None = None

    def bwrap_path(self) -> str:
        """The bwrap binary; SandboxError if it is not installed."""
        path = shutil.which("bwrap", path="/usr/bin:/usr/local/bin:/bin")
        if not path:
            raise SandboxError("bubblewrap (bwrap) is not installed",
                               hint="apt-get install bubblewrap, or run make demo")
        return path

    def seccomp_bpf(self) -> bytes:
        """The compiled seccomp filter (cached)."""
        if self._bpf is None:
            self._bpf = seccomp.load_bpf(self.settings.cache_dir)
        return self._bpf

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

    def check(self) -> list[Finding]:
        """Host checks for ``stockade doctor`` (see ``checks.py``)."""
        from stockade.sandbox.checks import check_host

        return check_host(self)

    def prepare(self, request: SandboxRequest) -> BwrapSandbox:
        """Create the job's tmpfs mounts, workspace copy and cgroup."""
        sandbox = BwrapSandbox(self, request, self.bwrap_path())
        self.start(sandbox)
        return sandbox


class BwrapSandbox(PreparedJob):
    """One job's prepared bubblewrap sandbox."""

    backend: BwrapBackend

    def __init__(self, backend: BwrapBackend, request: SandboxRequest, bwrap: str) -> None:
        super().__init__(backend, request)
        self.bwrap = bwrap

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
            self.spawn([self.bwrap, "--args", str(args_fd), "--", *self.command()],
                       user=self.host_uid, group=self.host_uid, extra_groups=[],
                       pass_fds=passed, preexec_fn=in_child)
        finally:
            for fd in passed:
                os.close(fd)
        timed_out, returncode = self.supervise(start + step.timeout, sink)
        status = read_status(status_r)
        if "child-pid" in status:  # bwrap's own init can outlive bwrap by a moment: reap it
            reaper.reap([status["child-pid"]], time.monotonic() + 5)
        if "child-pid" not in status and not (timed_out or self._killed):
            raise not_started("bwrap", returncode)
        oom = self.cgroup.oom_kills() > ooms_before
        code = status.get("exit-code")
        failed_at = read_failed_at(self.job_dir / "tmp" / FAILED_FILE)
        return StepExit(exit_code=None if (timed_out or self._killed or code is None) else code,
                        timed_out=timed_out, oom_killed=oom,
                        duration_s=time.monotonic() - start,
                        failed_at=failed_at if code else None)
