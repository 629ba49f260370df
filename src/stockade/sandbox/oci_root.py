"""The skeleton an OCI runtime mounts a job's root on: mount points and links, nothing else.

A runtime needs its root as a directory whose mount points exist (read-only, it cannot make
them; in its user namespace it could not write there anyway). For ``image: host`` that is
``usr`` (bound from the host), ``etc`` (the synthetic one) and the places every job gets
(``proc``, ``dev``, ``tmp``, ``run``, ``workspace``), with the links ``bin``, ``sbin``,
``lib``, ``lib64`` into ``usr``; for an image, one empty directory or file per top-level
entry of its tree (each bound read-only from it) and its top-level links recreated as links
(they resolve inside the sandbox, never on the host). A skeleton holds nothing of a job: it
is built once per installation (and per image), root-owned and read-only to others, by an
atomic rename, in the installation's runtime directory under a name the reaper never takes
for a job's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stockade.sandbox.image_root import Entry, build_once, top_entries

HOST_LINKS = (Entry("bin", False, "usr/bin"), Entry("sbin", False, "usr/sbin"),
              Entry("lib", False, "usr/lib"), Entry("lib64", False, "usr/lib64"))
JOB_DIRS = ("etc", "proc", "dev", "tmp", "run", "workspace")
PREFIX = ".oci-root-"
_LAYOUT = 1  # bump when what a skeleton holds changes


def host_skeleton(runtime_dir: Path) -> Path:
    """The skeleton of ``image: host`` jobs."""
    return _skeleton(runtime_dir / f"{PREFIX}host-{_LAYOUT}",
                     [Entry("usr", True), *HOST_LINKS])


def image_skeleton(runtime_dir: Path, tree: Path) -> Path:
    """The skeleton of jobs on the image unpacked at ``tree`` (named by its chain id)."""
    target = runtime_dir / f"{PREFIX}img-{tree.name}-{_LAYOUT}"
    if not target.is_dir():
        _forget_evicted(runtime_dir, tree.parent)
    return _skeleton(target, top_entries(tree))


def _skeleton(target: Path, entries: list[Entry]) -> Path:
    def fill(tmp: Path) -> None:
        for entry in [*entries, *(Entry(name, True) for name in JOB_DIRS)]:
            path = tmp / entry.name
            if entry.link is not None:
                os.symlink(entry.link, path)
            elif entry.is_dir:
                path.mkdir(mode=0o755)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o644))

    return build_once(target, fill, f"the root's skeleton {target.name}")


def _forget_evicted(runtime_dir: Path, trees: Path) -> None:
    """Remove the skeletons of images whose trees the cache evicted."""
    for old in runtime_dir.glob(f"{PREFIX}img-*"):
        chain = old.name.removeprefix(f"{PREFIX}img-").rsplit("-", 1)[0]
        if not (trees / chain).is_dir():
            shutil.rmtree(old, ignore_errors=True)
