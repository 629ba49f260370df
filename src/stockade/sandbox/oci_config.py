"""The OCI runtime spec (``config.json``) of one step: the hardening baseline as runc and runsc
read it.

Everything is explicit rather than a runtime's default: a user namespace mapping the job user
(uid/gid 1000) to the job's own host uid and the namespace's root (used by the runtime's own
set-up only, before it executes the step) to a second unprivileged uid of the pool, nothing to
host root (for runc the job's own, made by its host uid and joined by path: the maps stay in
the document, runc 1.1 reads them for the container's root and user but writes them only for
a namespace it makes); every other namespace new except, with egress, the network (the job's
own, joined by path); all five capability sets empty; ``noNewPrivileges``; the seccomp
profile of ``seccomp_profile.py`` (the same rules and errnos bwrap's BPF has); a read-only
root; ``/proc`` with the host-revealing entries masked and the kernel's knobs read-only (as
bwrap's ``--proc``); a minimal read-only ``/dev``; no core dumps; the job's cgroup limits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from stockade.sandbox import seccomp_profile as profile
from stockade.sandbox.cgroups import CPU_PERIOD_US, Limits
from stockade.sandbox.plumbing import MASKED_PROC, MASKED_PROC_DIRS
from stockade.sandbox.rootfs import JOB_GID, JOB_UID

OCI_VERSION = "1.0.2"
# what bwrap's --proc makes read-only (the kernel's knobs)
READONLY_PROC = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
ARCHES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
NAMESPACES = ("pid", "ipc", "uts", "mount", "cgroup")  # new; user and network: see config
_BIND_RO = ["rbind", "ro", "nosuid", "nodev"]


class StepConfig(NamedTuple):
    """What one step's container is made of (paths are host paths unless said otherwise)."""

    hostname: str
    root: str  # the root's skeleton: mount points and links only (see oci_root.py)
    args: Sequence[str]
    env: Mapping[str, str]
    job_uid: int  # uid/gid 1000 inside
    setup_uid: int  # uid/gid 0 inside: the runtime's set-up, never the step
    root_binds: Sequence[tuple[str, str]]  # (source, path inside), read-only
    workspace: str
    tmp: str
    files: Sequence[tuple[str, str]]  # (source, path inside /run), read-only
    netns: str | None  # the job's network namespace (egress), else a new one
    userns: str | None  # the job's user namespace (runc), else a new one
    cgroups_path: str
    limits: Limits
    shm_bytes: int


def config(step: StepConfig) -> dict[str, Any]:
    """The ``config.json`` document."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": JOB_UID, "gid": JOB_GID, "additionalGids": []},
            "args": list(step.args),
            "env": [f"{name}={value}" for name, value in step.env.items()],
            "cwd": "/workspace",
            "capabilities": {name: [] for name in CAPABILITY_SETS},
            "noNewPrivileges": True,
            # no core dumps: a core_pattern pipe helper would run on the host, as root. runc
            # applies rlimits with prlimit from outside, which needs CAP_SYS_RESOURCE over a
            # user namespace root does not own (root lacks it on some hosts): in a joined
            # one the container inherits the core limit runc is started with instead
            "rlimits": [] if step.userns else [{"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
        },
        "root": {"path": step.root, "readonly": True},
        "hostname": step.hostname,
        "mounts": _mounts(step),
        "linux": {
            "uidMappings": _mappings(step),
            "gidMappings": _mappings(step),
            "namespaces": [{"type": t} for t in NAMESPACES]
            + [_namespace("user", step.userns), _namespace("network", step.netns)],
            "cgroupsPath": step.cgroups_path,
            "resources": _resources(step.limits),
            "seccomp": seccomp(),
            "maskedPaths": [*MASKED_PROC, *MASKED_PROC_DIRS],
            "readonlyPaths": [*READONLY_PROC, "/run"],
        },
    }


def id_map(job_uid: int, setup_uid: int) -> list[tuple[int, int]]:
    """(inside, host) of the container's user namespace, uids and gids alike: its root (the
    runtime's set-up) and the job user, each to an unprivileged host uid of the pool."""
    return [(0, setup_uid), (JOB_UID, job_uid)]


def _mappings(step: StepConfig) -> list[dict[str, int]]:
    return [{"containerID": inside, "hostID": host, "size": 1}
            for inside, host in id_map(step.job_uid, step.setup_uid)]


def _namespace(kind: str, path: str | None) -> dict[str, str]:
    return {"type": kind, **({"path": path} if path else {})}


def _mounts(step: StepConfig) -> list[dict[str, Any]]:
    def bind(source: str, dest: str, options: list[str]) -> dict[str, Any]:
        return {"destination": dest, "type": "bind", "source": source, "options": options}

    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        # read-only once the runtime made its few device nodes in it
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "noexec", "strictatime", "mode=755", "size=64k", "ro"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "nodev", "mode=1777", f"size={step.shm_bytes}"]},
        *[bind(source, dest, _BIND_RO) for source, dest in step.root_binds],
        bind(step.workspace, "/workspace", ["rbind", "rw", "nosuid", "nodev"]),
        bind(step.tmp, "/tmp", ["rbind", "rw", "nosuid", "nodev"]),
        # read-only (readonlyPaths) once the step's files are bound in
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "noexec", "mode=755", "size=64k"]},
        *[bind(source, dest, _BIND_RO) for source, dest in step.files],
    ]


def _resources(limits: Limits) -> dict[str, Any]:
    """The limits the job's cgroup has, also on the step's own child cgroup."""
    quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
    return {
        "devices": [{"allow": False, "access": "rwm"}],  # the runtime allows its minimal set
        # swap equal to memory: no swap at all (memory+swap on v1, swap.max 0 on v2)
        "memory": {"limit": limits.memory_bytes, "swap": limits.memory_bytes},
        "pids": {"limit": limits.pids},
        "cpu": {"quota": quota, "period": CPU_PERIOD_US},
    }


def seccomp(machine: str | None = None) -> dict[str, Any]:
    """``linux.seccomp``: the profile for this machine's architecture only (a foreign ABI's
    syscalls are refused by the runtime's filter as an unknown architecture)."""
    arch = ARCHES.get(machine or os.uname().machine)
    if arch is None:
        from stockade.errors import SandboxError

        raise SandboxError(f"no seccomp profile for architecture {machine}",
                           hint=f"stockade runs jobs on {' and '.join(ARCHES)} only")
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": profile.REFUSED_ERRNO,
        "architectures": [arch],
        "syscalls": [{"names": list(profile.ALLOW), "action": "SCMP_ACT_ALLOW"},
                     *[_rule(rule) for rule in profile.CONDITIONAL]],
    }


def _rule(rule: profile.Rule) -> dict[str, Any]:
    entry: dict[str, Any] = {"names": [rule.syscall]}
    if rule.errno is None:
        entry["action"] = "SCMP_ACT_ALLOW"
    else:
        entry.update(action="SCMP_ACT_ERRNO", errnoRet=rule.errno)
    c = rule.condition
    if c is not None:
        entry["args"] = [{"index": c.arg, "value": c.value, "valueTwo": c.value_two,
                          "op": f"SCMP_CMP_{c.op}"}]
    return entry
