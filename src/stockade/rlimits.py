"""The process's own resource limits, raised where stockade needs more than a default."""

from __future__ import annotations

import resource

CEILING = 1 << 20  # never ask for more open files than this


def raise_open_files(wanted: int = CEILING) -> int:
    """Raise the soft limit of open files towards ``wanted`` (at most the hard limit); the
    soft limit in force afterwards (``RLIM_INFINITY`` counted as ``wanted``). Every job's
    egress proxy and every connection of a server is a descriptor of the process, and a
    service manager's default soft limit (1024) is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    if soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    return soft
