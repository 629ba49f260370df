"""Small pieces of the bwrap backend: where the egress proxy listens, the masked ``/proc``
entries, memfds, bwrap's status, the step's failure trap."""

from __future__ import annotations

import contextlib
import json
import os
import select
import stat
from pathlib import Path

PROXY_PORT = 3128
SEE_LOG = "; see the log above"  # (a job's log: the runtime's own words precede the note)
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
# /proc files that tell a job about the host (boot arguments, kernel addresses, keys, timers),
# covered with /dev/null as Docker's masked paths are
MASKED_PROC = ("/proc/cmdline", "/proc/kallsyms", "/proc/kcore", "/proc/keys",
               "/proc/key-users", "/proc/latency_stats", "/proc/timer_list",
               "/proc/sched_debug", "/proc/sysrq-trigger", "/proc/config.gz", "/proc/modules",
               "/proc/vmallocinfo", "/proc/iomem", "/proc/ioports",
               "/proc/sys/kernel/random/boot_id")
MASKED_PROC_DIRS = ("/proc/acpi", "/proc/scsi", "/proc/asound")  # covered with empty tmpfs


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable (or closed) within ``timeout`` seconds. poll, never
    select: a runner holding many descriptors (egress proxies) has fds above select's 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def memfd(name: str, data: bytes) -> int:
    """An in-memory file holding ``data``, positioned at its start, close-on-exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_status(fd: int) -> dict[str, int]:
    """Merge bwrap's JSON status documents (``child-pid``, then ``exit-code``)."""
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    status: dict[str, int] = {}
    for line in raw.decode(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            status.update({k: v for k, v in doc.items() if isinstance(v, int)})
    return status


# bash reads BASH_ENV before the step's script (whose line numbers stay its own): on every
# command that fails, the trap overwrites a small file in the job's /tmp with its line and text;
# nothing blocks however often it fires, and child shells do not inherit it
TRAP_PATH = "/run/stockade/trap.sh"
FAILED_FILE = ".stockade-failed"
ERR_TRAP = (b"unset BASH_ENV\n"
            b"trap '{ printf \"%s\\t%s\\n\" \"$LINENO\" \"$BASH_COMMAND\" > /tmp/"
            + FAILED_FILE.encode() + b"; } 2>/dev/null' ERR\n")


def read_failed_at(path: Path) -> str | None:
    """``line N: COMMAND`` from the file the trap wrote (then removed); None if there is none.
    The job could write the file itself: it is opened without following a link, must be a
    regular file, and at most 4 KiB of it is read; what it says is the job's own text."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        raw = b""
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
    number, tab, command = raw.split(b"\n", 1)[0].partition(b"\t")
    if not tab or not number.isdigit() or len(number) > 9:
        return None
    text = command.decode("utf-8", "replace").strip()
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"line {int(number)}: {text}"
