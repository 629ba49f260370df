"""Kernel settings ``stockade doctor`` reads, and what each means for a host running jobs.

Each is a defence in depth, reported as a warning when it is off: the sandbox already blocks
what the setting guards (seccomp refuses ``bpf`` and ``perf_event_open``, ``/proc/kallsyms`` is
masked, each job has its own host uid and no host-side process of a job sees a sticky
directory), and the runner never follows a path a job could have changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from stockade.sandbox.interface import Finding


class Sysctl(NamedTuple):
    """One setting: its name, the least safe value, why it matters here."""

    name: str
    minimum: int
    meaning: str

    @property
    def path(self) -> Path:
        """Its file under /proc/sys."""
        return Path("/proc/sys") / self.name.replace(".", "/")


SYSCTLS = (
    Sysctl("fs.protected_symlinks", 1,
           "root never follows a symlink another user planted in a sticky directory"),
    Sysctl("fs.protected_hardlinks", 1,
           "users cannot hardlink files they do not own (no planted links to host files)"),
    Sysctl("kernel.kptr_restrict", 1,
           "kernel addresses are hidden from unprivileged readers (KASLR stays secret)"),
    Sysctl("kernel.perf_event_paranoid", 2,
           "unprivileged perf events are limited (seccomp also refuses perf_event_open)"),
    Sysctl("kernel.unprivileged_bpf_disabled", 1,
           "unprivileged users cannot load BPF programs (seccomp also refuses bpf)"),
    Sysctl("kernel.yama.ptrace_scope", 1,
           "a process can only ptrace its own descendants (jobs also have separate uids)"),
)


def check_sysctls() -> list[Finding]:
    """One finding per setting, naming its value, its meaning here and the remedy."""
    found = []
    for s in SYSCTLS:
        try:
            value: int | None = int(s.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            value = None
        ok = value is not None and value >= s.minimum
        state = "not available on this kernel" if value is None else f"= {value}"
        detail = f"{state}; at {s.minimum} or more: {s.meaning}"
        remedy = "" if value is None else (f"sysctl -w {s.name}={s.minimum} (and persist it "
                                           "in /etc/sysctl.d/)")
        found.append(Finding(f"sysctl {s.name}", ok, detail, "" if ok else remedy,
                             required=False))
    return found
