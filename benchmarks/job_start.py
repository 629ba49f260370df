"""Job start-up cost, measured side by side against a raw hardened ``bwrap ... true``.

(a) In-process sandbox start: prepare (tmpfs mounts, cgroup), spawn, first instruction of a
    trivial step, teardown (kill, unmount, remove, verify) -- as the runner does it per job.
(b) ``stockade run`` of a trivial job end to end (CLI start, spec, SQLite transactions,
    sandbox, result) as a subprocess; once with the validated spec cached (an unchanged spec,
    the usual case) and once with a spec that changes every run (validation every time).
(c) if podman is installed: a locked-down ``podman run`` of a tiny busybox image (imported
    from Debian's busybox-static, runc, no network, all capabilities dropped, read-only,
    no-new-privileges, pids and memory limits), the comparison target of (b).

(a) and (b) run for each sandbox backend usable here (``bwrap``; ``oci``, runc, if
installed); every RESULT line names its ``backend``.

Each baseline run is a raw bwrap with the same hardening flags and seccomp filter, started as
the same unprivileged user, interleaved with the measured runs so that both see the same
machine load. Prints medians and ratios. Run as root: ``make bench``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from support.sides import compare, remove_installation

from stockade.config import ensure_home, load_settings
from stockade.sandbox import get_backend
from stockade.sandbox.bwrap import BwrapBackend, BwrapSandbox
from stockade.sandbox.interface import Backend, SandboxRequest, StepRun
from stockade.sandbox.plumbing import memfd

STOCKADE = str(Path(sys.executable).parent / "stockade")
RAW = "raw hardened bwrap"


def raw_bwrap(backend: BwrapBackend, box: BwrapSandbox) -> Callable[[], None]:
    """A raw hardened bwrap running ``true``: the same options (in argv), filter and host uid
    as a step of ``box`` (whose job directory provides the bind sources), minus everything
    stockade does around it (no cgroup, no mounts, no memfd of options, no teardown)."""

    def run() -> None:
        seccomp_fd = memfd("seccomp", backend.seccomp_bpf())
        script_fd = memfd("script", b"true\n")
        status_r, status_w = os.pipe()
        options = box.options(seccomp_fd, script_fd, status_w, {"PATH": "/usr/bin:/bin"})
        subprocess.run([backend.bwrap_path(), *options, "--", *box.command()],
                       env={"PATH": "/usr/bin:/bin"}, user=box.host_uid, group=box.host_uid,
                       extra_groups=[], check=True,
                       pass_fds=(seccomp_fd, script_fd, status_w), stdout=subprocess.DEVNULL)
        for fd in (seccomp_fd, script_fd, status_w, status_r):
            os.close(fd)

    return run


def in_process(backend: BwrapBackend, n: int, subject: Backend | None = None) -> None:
    """One sandbox of ``subject`` (default: ``backend``) per iteration: prepare, run
    ``true``, teardown; against a raw bwrap of ``backend``."""
    measured = subject or backend
    step = StepRun("bench", "true\n", {"PATH": "/usr/bin:/bin"}, 30)

    def start() -> None:
        box = measured.prepare(SandboxRequest(f"bench-{os.getpid()}-{time.monotonic_ns()}", 1,
                                             256 << 20, 64, 16 << 20, 16 << 20, None))
        try:
            exit = box.run(step, lambda _: None)
            assert exit.exit_code == 0, exit
        finally:
            assert box.teardown() == []

    probe = backend.prepare(SandboxRequest("bench-argv", 1, 256 << 20, 64, 16 << 20,
                                           16 << 20, None))
    baseline = raw_bwrap(backend, probe)
    try:
        compare("(a) sandbox start in the runner", start, baseline, n, RAW,
                backend=measured.name)
    finally:
        probe.teardown()


def end_to_end(backend: BwrapBackend, n: int, name: str = "bwrap") -> None:
    """``stockade run`` of a one-step ``true`` job on backend ``name``, with the spec cached
    and not."""
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-"))
    spec = work / "job.yaml"
    env = {**os.environ, "STOCKADE_HOME": str(work / "home"), "STOCKADE_SANDBOX_BACKEND": name}
    (work / "ws").mkdir()
    counter = iter(range(10**9))

    def run(changing: bool = False) -> None:
        suffix = f"# run {next(counter)}\n" if changing else ""
        spec.write_text(f"name: trivial\nsteps:\n  - {{name: t, run: 'true'}}\n{suffix}")
        subprocess.run([STOCKADE, "run", str(spec), "--workspace", str(work / "ws")],
                       env=env, check=True, stderr=subprocess.DEVNULL)

    run()  # create and migrate the database once, outside the measurement
    probe = backend.prepare(SandboxRequest("bench-e2e", 1, 256 << 20, 64, 16 << 20,
                                           16 << 20, None))
    baseline = raw_bwrap(backend, probe)
    try:
        compare("(b) stockade run, spec cached", run, baseline, n, RAW, backend=name)
        compare("(b) stockade run, spec validated", lambda: run(True), baseline, n, RAW,
                backend=name)
        podman = podman_run(work)
        if podman:
            compare("(c) locked-down podman run", podman, baseline, n, RAW, backend="podman")
            compare("(d) stockade run, spec cached", run, podman, n, "locked-down podman run",
                    backend=name)
        else:
            print("(c) podman is not installed: apt-get install podman runc busybox-static")
    finally:
        probe.teardown()
        remove_installation(work / "home")
        shutil.rmtree(work, ignore_errors=True)


def podman_run(work: Path) -> Callable[[], None] | None:
    """A locked-down ``podman run`` of a tiny image, or None if podman is missing."""
    if not (shutil.which("podman") and shutil.which("runc") and Path("/bin/busybox").exists()):
        return None
    root = work / "tiny" / "bin"
    root.mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "busybox")
    os.symlink("busybox", root / "true")
    image = "localhost/stockade-bench-tiny:latest"
    tar = subprocess.run(["tar", "-C", str(root.parent), "-c", "."], capture_output=True,
                         check=True).stdout
    subprocess.run(["podman", "import", "-", image], input=tar, check=True,
                   capture_output=True)
    argv = ["podman", "--runtime", "runc", "run", "--rm", "--network", "none",
            "--cap-drop", "all", "--read-only", "--security-opt", "no-new-privileges",
            "--pids-limit", "64", "--memory", "256m", "--ulimit", "nofile=1024:1024",
            "--ulimit", "nproc=1024:1024", image, "/bin/true"]

    def run() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    return run


def main() -> None:
    """Run both measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="runs of (a); (b) runs n/4")
    args = parser.parse_args()
    settings = load_settings()
    ensure_home(settings)
    backend = BwrapBackend(settings)
    names = ["bwrap", *(["oci"] if shutil.which("runc", path="/usr/sbin:/usr/bin") else [])]
    for name in names:
        in_process(backend, args.n, None if name == "bwrap" else get_backend(name, settings))
    for name in names:
        end_to_end(backend, max(20, args.n // 4), name)


if __name__ == "__main__":
    main()
