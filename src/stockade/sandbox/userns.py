"""A job's own user namespace for runc (the ``oci`` backend), made by the job's host uid.

The kernel charges per-user counts (inotify instances and watches, user namespaces, mqueue
bytes, ...) level by level up the user namespaces, at each level to the owner of the namespace
below: a namespace runc makes (as root) charges every count of its job to host root too, so one
job could exhaust root's. So the job's own host uid makes it, as with bwrap: a helper started
as that uid (fixed environment, no supplementary groups) unshares ``CLONE_NEWUSER`` (with
egress together with ``CLONE_NEWNET``: a network namespace the user namespace owns, which runc
can still join once it is in the user namespace) and waits; root writes its maps (the job user
1000 to the job's uid, 0, runc's set-up, to the second pool uid, nothing to host root;
``setgroups`` stays allowed: runc drops its own supplementary groups with it, the step has no
capability to call it) and keeps an fd of each namespace; the helper then exits, before any
step runs. runc joins them by path (``/proc/<runner>/fd/<fd>``), so nothing of them outlives
both the runner and the job's processes, however the runner ends. runc enters as host uid 0
(with no capability outside the namespace) and its init makes itself the container's root
(``setuid(0)``) before anything else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from stockade.errors import SandboxError
from stockade.sandbox.plumbing import readable

SETPRIV = "/usr/bin/setpriv"  # util-linux, as unshare: no fork of the whole runner for a uid
UNSHARE = "/usr/bin/unshare"
CAT = "/usr/bin/cat"  # the helper once in its namespaces: echoes one byte, exits at EOF
READY_TIMEOUT_S = 10.0
ERROR_BYTES = 4096


class JobNamespaces:
    """fds of a job's user namespace and (jobs with egress) of the network namespace it
    owns, held by the runner until :meth:`close`."""

    def __init__(self, user: int, net: int | None) -> None:
        self.user = user
        self.net = net
        self._open = [fd for fd in (user, net) if fd is not None]

    @property
    def user_path(self) -> str:
        """The user namespace's path, for a runtime that joins it."""
        return f"/proc/{os.getpid()}/fd/{self.user}"

    def close(self) -> None:
        """Drop the runner's hold (the namespaces go once nothing else is in them)."""
        while self._open:
            os.close(self._open.pop())


def start(owner: int, network: bool, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the helper that makes a user namespace owned by host uid ``owner`` (and with
    ``network`` a network namespace in it); :func:`finish` it, or :func:`end` it."""
    argv = [SETPRIV, f"--reuid={owner}", f"--regid={owner}", "--clear-groups", "--",
            UNSHARE, "--user", *(["--net"] if network else []), "--", CAT]
    try:
        return subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxError(f"cannot start {SETPRIV}: {e}",
                           hint="apt-get install util-linux") from e


def finish(helper: subprocess.Popen[bytes], mappings: list[tuple[int, int]],
           network: bool) -> JobNamespaces:
    """The namespaces of a :func:`start`-ed helper, with ``mappings`` ((inside, host)
    pairs, uid and gid alike); the helper is ended either way."""
    opened: list[int] = []
    try:
        _await(helper)
        proc = Path(f"/proc/{helper.pid}")  # not reaped before the end: the pid is its own
        table = "".join(f"{inside} {host} 1\n" for inside, host in mappings).encode()
        for name in ("uid_map", "gid_map"):
            _write(proc / name, table)
        opened.append(_open_ns(proc / "ns" / "user", "user"))
        if network:
            opened.append(_open_ns(proc / "ns" / "net", "net"))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    finally:
        end(helper)
    return JobNamespaces(opened[0], opened[1] if network else None)


def _await(helper: subprocess.Popen[bytes]) -> None:
    """Wait for the helper to be in its namespaces (its ``cat`` echoes a byte)."""
    assert helper.stdin is not None and helper.stdout is not None
    os.write(helper.stdin.fileno(), b"\n")
    out = helper.stdout.fileno()
    if readable(out, READY_TIMEOUT_S) and os.read(out, 1) == b"\n":
        return
    helper.kill()
    assert helper.stderr is not None
    said = helper.stderr.read(ERROR_BYTES).decode(errors="replace").strip()
    raise SandboxError(f"cannot make the job's user namespace: {said or 'no answer'}",
                       hint="the job's host uid must be able to create user namespaces "
                       "(sysctl kernel.unprivileged_userns_clone=1); see stockade doctor")


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)  # one write: the kernel takes a map only whole
    finally:
        os.close(fd)


def _open_ns(path: Path, kind: str) -> int:
    """An fd of the namespace at ``path``, refused if it is the runner's own."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if os.fstat(fd).st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino:
        os.close(fd)
        raise SandboxError(f"the job's helper did not get a {kind} namespace of its own")
    return fd


def end(helper: subprocess.Popen[bytes]) -> None:
    """Close the helper's input (it exits) and reap it; killed if it does not."""
    for pipe in (helper.stdin, helper.stdout, helper.stderr):
        if pipe is not None:
            pipe.close()
    try:
        helper.wait(timeout=READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()
