"""Run Python code on hostile input in a confined child, never unconfined on the host.

The tests run as root; code that unpacks a hostile archive or layer must not, if it has a
bug, be able to write anywhere but the test's own directory. :func:`box` makes that
directory under /var/tmp (pytest's ``tmp_path`` lies under a 0700 root directory that the
child cannot reach): ``root`` (0755, root's: the test's inputs, read-only to the child) and
``root/work`` (owned by uid 65534: the only place the child can write).

:func:`run_confined` runs a script there as::

    setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --no-new-privs \\
      bwrap --unshare-all --unshare-user --disable-userns --uid 0 --gid 0 \\
        --cap-add CAP_DAC_OVERRIDE --die-with-parent --new-session --ro-bind / / \\
        --bind WORK WORK --dev /dev --proc /proc --tmpfs /tmp --clearenv ... python3 -I -B

so the child is root in a user namespace that is uid 65534 outside (an escape lands
unprivileged), with every namespace new (no network), the whole file system read-only but
``WORK``, and only ``CAP_DAC_OVERRIDE`` inside, over what it owns (root unpacking a layer
writes into directories whose modes deny it; without it the child would not behave as the
runner does). The interpreter is Debian's ``/usr/bin/python3`` (3.11, like the virtualenv's)
with a copy of the project's ``src/stockade`` in the box on its path: a checkout (and its
virtualenv) may lie under a 0700 directory such as /root, which uid 65534 cannot enter.
The script gets ``params`` (JSON values) and sets ``result``; the child answers one JSON
line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": CLASS, "message": TEXT}``.
Its address space is limited to :data:`MEMORY` bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

NOBODY = 65534
PYTHON = "/usr/bin/python3"
SRC = Path(__file__).resolve().parents[2] / "src"
MEMORY = 2 * 1024**3
TIMEOUT = 120.0

_CHILD = f"""
import json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, ({MEMORY}, {MEMORY}))
request = json.loads(sys.stdin.read())
sys.path.insert(0, request["src"])
namespace = {{"params": request["params"], "result": None}}
try:
    exec(compile(request["script"], "<confined>", "exec"), namespace)
    answer = {{"ok": True, "result": namespace["result"]}}
except Exception as e:
    answer = {{"ok": False, "error": type(e).__name__, "message": str(e),
              "traceback": traceback.format_exc()}}
sys.stdout.write("\\n" + json.dumps(answer) + "\\n")
"""


class Box(NamedTuple):
    """A test directory: ``root`` (read-only to the child) and ``work`` (its only
    writable place)."""

    root: Path
    work: Path


@contextmanager
def box() -> Iterator[Box]:
    """A fresh :class:`Box`, removed afterwards (whatever the child left in it)."""
    root = Path(tempfile.mkdtemp(prefix="stockade-confined-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        shutil.copytree(SRC / "stockade", root / "src" / "stockade",
                         ignore=shutil.ignore_patterns("__pycache__"))
        work = root / "work"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        work.chmod(0o755)
        yield Box(root, work)
    finally:
        shutil.rmtree(root)


def command(b: Box) -> list[str]:
    """The command line that runs the child's Python under the confinement."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", "--no-new-privs",
            "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "0",
            "--gid", "0", "--cap-add", "CAP_DAC_OVERRIDE", "--die-with-parent",
            "--new-session", "--ro-bind", "/", "/", "--bind", str(b.work), str(b.work),
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--chdir", "/",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            PYTHON, "-I", "-B", "-c", _CHILD]


def run_confined(b: Box, script: str, timeout: float = TIMEOUT, **params: Any) -> dict[str, Any]:
    """Run ``script`` confined in ``b`` with ``params``; the child's JSON answer. The test
    fails if the child itself fails (no answer)."""
    request = json.dumps({"src": str(b.root / "src"), "script": script, "params": params})
    proc = subprocess.run(command(b), input=request, capture_output=True, text=True,
                          timeout=timeout, cwd="/", env={"PATH": "/usr/bin:/bin"}, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"the confined child failed (exit {proc.returncode}): "
                             f"{proc.stderr[-4000:]}")
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer
