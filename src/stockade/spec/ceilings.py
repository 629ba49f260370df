"""Operator ceilings: the most any job on this runner may ask for.

The spec model bounds each resource by what no machine could give (:mod:`.model`); the
operator's settings (``max_cpus``, ``max_memory_bytes``, ``max_pids``, ``max_tmp_bytes``,
``max_workspace_bytes``, ``max_timeout_s``) bound it by what this runner allows. A job may
narrow its limits below a ceiling, never widen them past it: a spec above a ceiling is refused
(exit 2) with the ceiling, its setting and its variable named. The ceilings are checked on
every load, after the spec cache, because they belong to the runner, not to the spec. A job
may also never take more than half of the host's process ids (``kernel.pid_max``), whatever
``max_pids`` says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.spec.job import Job
from stockade.spec.problems import spec_error
from stockade.spec.units import format_duration, format_spec_size

if TYPE_CHECKING:
    from stockade.config import Settings

PID_MAX_FILE = Path("/proc/sys/kernel/pid_max")

_Fmt = Callable[[float], str]


def _cpus(n: float) -> str:
    return f"{n:g}"


def _count(n: float) -> str:
    return str(int(n))


def _size(n: float) -> str:
    return format_spec_size(int(n))


def check(job: Job, settings: Settings, *, source: str = "<spec>") -> None:
    """Refuse ``job`` (:class:`~stockade.errors.SpecError`, exit 2) if it asks for more than
    ``settings`` allow; every resource above its ceiling is reported."""
    r, s = job.resources, settings
    pid_ceiling, pid_why = _pid_ceiling(s.max_pids)
    limits: list[tuple[str, float, float, str, _Fmt]] = [
        ("resources.cpus", r.cpus, s.max_cpus, "max_cpus, STOCKADE_MAX_CPUS", _cpus),
        ("resources.memory", r.memory, s.max_memory_bytes,
         "max_memory_bytes, STOCKADE_MAX_MEMORY", _size),
        ("resources.pids", r.pids, pid_ceiling, pid_why, _count),
        ("resources.tmp", r.tmp, s.max_tmp_bytes, "max_tmp_bytes, STOCKADE_MAX_TMP", _size),
        ("resources.workspace", r.workspace, s.max_workspace_bytes,
         "max_workspace_bytes, STOCKADE_MAX_WORKSPACE", _size),
        ("resources.timeout", r.timeout, s.max_timeout_s,
         "max_timeout_s, STOCKADE_MAX_TIMEOUT", format_duration),
    ]
    limits += [(f"steps[{i}].timeout", step.timeout, s.max_timeout_s,
                "max_timeout_s, STOCKADE_MAX_TIMEOUT", format_duration)
               for i, step in enumerate(job.steps) if step.timeout is not None]
    problems = [
        f"{path}: {fmt(value)} is above this runner's ceiling of {fmt(ceiling)} ({why}); "
        "ask for less or have the operator raise it"
        for path, value, ceiling, why, fmt in limits if not value <= ceiling
    ]
    if problems:
        raise spec_error(source, problems)


def _pid_ceiling(max_pids: int) -> tuple[int, str]:
    """``max_pids``, or half of the host's ``kernel.pid_max`` if that is lower."""
    host = host_pid_max()
    if host is not None and host // 2 < max_pids:
        return host // 2, f"half of this host's kernel.pid_max {host}"
    return max_pids, "max_pids, STOCKADE_MAX_PIDS"


def host_pid_max() -> int | None:
    """The host's ``kernel.pid_max``, or ``None`` where it cannot be read; read again after
    :data:`PID_MAX_TTL_S` (a server checks every submission: three system calls each)."""
    global _pid_max
    now = time.monotonic()
    if _pid_max is not None and _pid_max[0] == PID_MAX_FILE and now < _pid_max[1]:
        return _pid_max[2]
    try:
        value: int | None = int(PID_MAX_FILE.read_text()[:32])
    except (OSError, ValueError):
        value = None
    _pid_max = (PID_MAX_FILE, now + PID_MAX_TTL_S, value)
    return value


PID_MAX_TTL_S = 10.0
_pid_max: tuple[Path, float, int | None] | None = None  # (file, read again after, value)
