"""Copying the user's workspace into the job's tmpfs, and nothing but files, dirs and links."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from stockade.errors import SandboxError, UsageError


def _only_plain(directory: str, names: list[str]) -> set[str]:
    """Skip sockets, FIFOs and device nodes: opening a FIFO would hang the copy."""
    skipped = set()
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skipped.add(name)
    return skipped


def copy_workspace(src: Path, dst: Path, uid: int, gid: int, limit: int) -> None:
    """Copy ``src`` into the existing directory ``dst`` and give it all to ``uid``:``gid``."""
    if not src.is_dir():
        raise UsageError(f"workspace {src} is not a directory", hint="pass --workspace DIR")
    try:
        shutil.copytree(src, dst, symlinks=True, ignore=_only_plain, dirs_exist_ok=True)
    except shutil.Error as e:
        _raise_copy_error(src, e.args[0][0][2] if e.args and e.args[0] else str(e), limit)
    except OSError as e:
        _raise_copy_error(src, e, limit)
    for root, dirs, files in os.walk(dst):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), uid, gid)


def _raise_copy_error(src: Path, e: object, limit: int) -> None:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
        raise UsageError(
            f"workspace {src} does not fit into the job's workspace limit ({limit} bytes)",
            hint="raise resources.workspace in the job spec or pass a smaller --workspace",
        )
    raise SandboxError(f"cannot copy the workspace {src}: {e}")
