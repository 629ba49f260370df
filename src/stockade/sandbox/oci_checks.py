"""Host checks of the OCI backends (``oci``: runc, ``runsc``: gVisor) for ``stockade doctor``.

Besides what every backend needs (``checks.py``): the runtime's binary and version, user
namespaces (made by the job's own host uid for runc, by the runtime itself for runsc), two
host uids of the pool per job, the seccomp profile as OCI JSON for this architecture, and the
same end-to-end probe job bwrap runs, through the runtime: a runtime that cannot run the
hardened bundle here (crun on a hybrid cgroup layout, gVisor builds that cannot map the job's
user) is reported as unusable, with the probe's words.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.errors import StockadeError
from stockade.sandbox import oci_config
from stockade.sandbox.checks import (
    basics,
    environment,
    finding,
    uid_pool,
    unprivileged_userns,
    with_probe,
)
from stockade.sandbox.interface import Finding

if TYPE_CHECKING:
    from stockade.sandbox.oci import OciBackend

VERSION_TIMEOUT_S = 10.0
CONTROL = "sandbox runtime"  # the same control as bwrap's (attestation requires it)


def check_oci(backend: OciBackend) -> list[Finding]:
    """All findings of ``backend``, in the order a person would fix them."""
    findings = basics()
    userns = unprivileged_userns() if backend.runtime.joins_userns else _userns()
    findings += [_runtime(backend), uid_pool(backend, per_job=2), userns, _seccomp()]
    findings = with_probe(backend, findings + environment(backend))
    probe = findings[-1]
    if not probe.ok and probe.detail != "skipped: fix the problems above":
        findings[-1] = probe._replace(remedy=(
            f"{backend.runtime.binary} must run the hardened bundle: a user namespace mapping "
            "the job's user and the container's root to two unprivileged host uids, bind "
            "mounts only the job's uid may reach, the seccomp profile (Debian 12's runsc "
            "0.0~20221219 cannot: its sandbox is refused the job's mounts); install a "
            "release that can, or set sandbox_backend to a backend doctor reports usable"))
    return findings


def _runtime(backend: OciBackend) -> Finding:
    name = backend.runtime.binary
    try:
        path = backend.runtime_path()
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False,
                             timeout=VERSION_TIMEOUT_S, env={"PATH": "/usr/bin:/bin"}).stdout
    except StockadeError as e:
        return finding(CONTROL, False, e.message, e.hint)
    except (OSError, subprocess.SubprocessError) as e:
        return finding(CONTROL, False, f"{name} does not run: {e}",
                        f"apt-get install --reinstall {backend.runtime.package}")
    version = out.strip().splitlines()[0] if out.strip() else "unknown version"
    options = " ".join(backend.runtime.options)
    return finding(CONTROL, True, f"{name}: {path} ({version}){' ' + options if options else ''}")


def _userns() -> Finding:
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        limit = 0
    return finding("user namespaces", limit > 0, f"max_user_namespaces={limit} (the "
                    "runtime, as root, maps the job's user to its own host uid)",
                    "sysctl user.max_user_namespaces=10000")


def _seccomp() -> Finding:
    try:
        profile = oci_config.seccomp()
    except StockadeError as e:
        return finding("seccomp filter", False, e.message, e.hint)
    rules = sum(len(entry["names"]) for entry in profile["syscalls"])
    return finding("seccomp filter", True, f"the profile as OCI JSON for "
                    f"{profile['architectures'][0]} ({rules} syscall rules, default "
                    "EPERM; the same rules bwrap's BPF has)")
