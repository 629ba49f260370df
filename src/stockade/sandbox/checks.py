"""Host checks for ``stockade doctor``: what the hardening baseline needs and what is active.

The last check runs a real probe job through the backend and asserts, from inside the sandbox,
that the controls are in force (uid, capabilities, no_new_privs, seccomp, namespaces, limits).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.errors import StockadeError
from stockade.sandbox import cgroups, rootfs, seccomp
from stockade.sandbox.interface import Finding, SandboxRequest, StepRun
from stockade.sandbox.plumbing import SEE_LOG
from stockade.sandbox.sysctls import check_sysctls

if TYPE_CHECKING:
    from stockade.sandbox.bwrap import BwrapBackend
    from stockade.sandbox.interface import Backend
    from stockade.sandbox.job import JobBackend

PROBE_SCRIPT = r"""
fail() { echo "PROBE-FAIL $*"; exit 1; }
[ "$(id -u)" = 1000 ] || fail "uid is $(id -u), not 1000"
grep -q '^CapEff:[[:space:]]*0000000000000000$' /proc/self/status || fail "capabilities left"
grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/self/status || fail "no_new_privs not set"
grep -q '^Seccomp:[[:space:]]*2$' /proc/self/status || fail "seccomp filter not loaded"
[ "$(hostname)" = "$EXPECT_HOST" ] || fail "hostname is $(hostname)"
[ "$(cat /proc/1/comm)" = bwrap ] || [ "$$" = 1 ] || fail "not in a fresh pid namespace"
[ ! -e /sys/class ] || fail "/sys is visible"
[ -z "$(cat /proc/cmdline 2>/dev/null)" ] || fail "/proc/cmdline shows the boot arguments"
tr "\\0" " " </proc/1/cmdline | grep -q -- "--bind" && fail "bwrap's argv shows host paths"
touch /probe 2>/dev/null && fail "root filesystem is writable"
touch /usr/probe 2>/dev/null && fail "/usr is writable"
unshare -U true 2>/dev/null && fail "a user namespace could be created"
[ "$(ls /sys/class/net 2>/dev/null | wc -l)" -le 1 ] || fail "host network visible"
echo PROBE-OK
"""


def finding(control: str, ok: bool, detail: str, remedy: str = "",
            required: bool = True) -> Finding:
    """One finding (the remedy only where the control is not met)."""
    return Finding(control, ok, detail, "" if ok else remedy, required)


def check_host(backend: BwrapBackend) -> list[Finding]:
    """All findings, in the order a person would fix them."""
    findings = basics()
    findings += [_bwrap(backend), uid_pool(backend), unprivileged_userns(), _seccomp(backend)]
    return with_probe(backend, findings + environment(backend))


def basics() -> list[Finding]:
    """What every backend needs first: a supported architecture, root."""
    return [
        finding("architecture", seccomp.machine() in seccomp.SUPPORTED_ARCHES,
                 seccomp.machine(), "stockade supports x86_64 and aarch64"),
        finding("running as root", os.geteuid() == 0, f"euid {os.geteuid()}",
                 "run stockade as root: it creates cgroups, then drops to a per-job uid"),
    ]


def environment(backend: JobBackend) -> list[Finding]:
    """What every backend needs of the host besides its runtime: cgroups, kernel settings,
    the egress network, the CA store."""
    return [*_cgroups(), *check_sysctls(), _egress_network(), _ca_store(backend)]


def with_probe(backend: Backend, findings: list[Finding]) -> list[Finding]:
    """``findings`` and the end-to-end probe (skipped while a required check fails)."""
    if all(f.ok for f in findings if f.required):
        return [*findings, _probe(backend)]
    return [*findings, finding("end-to-end probe", False, "skipped: fix the problems above",
                                "fix the failed checks above")]


def backend_summary(name: str, findings: list[Finding], selected: bool) -> Finding:
    """One line for the sandbox backend ``name``: usable or not (the first failed check and
    its fix), marked required only for the backend this runner uses."""
    failed = next((f for f in findings if f.required and not f.ok), None)
    use = f"set sandbox_backend = \"{name}\" (STOCKADE_SANDBOX_BACKEND={name}) to use it"
    if failed is None:
        detail = "usable" + (" (selected)" if selected else f"; {use}")
        return finding(f"backend {name}", True, detail, required=selected)
    return finding(f"backend {name}", False,
                    f"not usable: {failed.control}: {failed.detail}"
                    + (" (selected)" if selected else ""),
                    failed.remedy or "see its checks", required=selected)


def _egress_network() -> Finding:
    """Whether the runner can make a job's network namespace with the proxy's listener in it
    (jobs with egress block/audit need it)."""
    from stockade.sandbox.netns import JobNetwork

    try:
        JobNetwork(0).close()
    except OSError as e:
        return finding("egress network", False, f"cannot make a job's network namespace: {e}",
                        "run as root on a kernel with network namespaces (CONFIG_NET_NS)",
                        required=False)
    return finding("egress network", True, "jobs with egress get a network namespace of "
                   "their own with the proxy on 127.0.0.1:3128 in it", required=False)


def _bwrap(backend: BwrapBackend) -> Finding:
    try:
        path = backend.bwrap_path()
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
        return finding("sandbox runtime", True, f"bubblewrap: {path} ({version})")
    except StockadeError as e:
        return finding("sandbox runtime", False, e.message, e.hint)


def uid_pool(backend: JobBackend, per_job: int = 1) -> Finding:
    """The operator's pool of per-job host uids (``per_job`` uids each job takes)."""
    try:
        pool = backend.uid_pool()
        return finding("per-job host uids", True,
                        f"{pool.start}-{pool.stop - 1} ({len(pool) // per_job} jobs at "
                        "once): each job "
                        "runs as its own unprivileged uid, an escape lands unprivileged")
    except StockadeError as e:
        return finding("per-job host uids", False, e.message, e.hint)


def unprivileged_userns() -> Finding:
    """Whether the job's own host uid may create user namespaces (bwrap's, runc's)."""
    limit = _read_int(Path("/proc/sys/user/max_user_namespaces"))
    clone = _read_int(Path("/proc/sys/kernel/unprivileged_userns_clone"), default=1)
    apparmor = _read_int(Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
                         default=0)
    ok = limit > 0 and clone == 1 and apparmor == 0
    return finding("user namespaces", ok,
                    f"max_user_namespaces={limit}, unprivileged_userns_clone={clone}, "
                    f"apparmor_restrict_unprivileged_userns={apparmor}",
                    "sysctl user.max_user_namespaces=10000 kernel.unprivileged_userns_clone=1 "
                    "kernel.apparmor_restrict_unprivileged_userns=0")


def _seccomp(backend: BwrapBackend) -> Finding:
    try:
        bpf = backend.seccomp_bpf()
        return finding("seccomp filter", True,
                        f"libseccomp profile compiled for {seccomp.machine()} "
                        f"({len(bpf) // 8} BPF instructions, Moby default plus extra refusals)")
    except StockadeError as e:
        return finding("seccomp filter", False, e.message, e.hint)


def _ca_store(backend: JobBackend) -> Finding:
    """What jobs trust for TLS: the host's public CA bundle plus the operator's extra CAs."""
    extra_file = backend.settings.tls_extra_ca_file
    try:
        extra = rootfs.extra_certificates(extra_file).count(b"-----BEGIN")
    except StockadeError as e:
        return finding("TLS CA store", False, e.message, e.hint)
    try:
        host = rootfs.certificates((Path("/etc") / rootfs.CERTS / rootfs.BUNDLE).read_bytes())
    except OSError:
        host = b""
    count = host.count(b"-----BEGIN")
    plus = f" plus {extra} from tls_extra_ca_file {extra_file}" if extra_file else ""
    return finding("TLS CA store", count + extra > 0,
                    f"jobs verify TLS against {count} host CA certificates{plus} at "
                    "/etc/ssl/certs (read-only, certificates only)",
                    "apt-get install ca-certificates, or set tls_extra_ca_file", required=False)


def _cgroups() -> list[Finding]:
    layout = cgroups.layout()
    remedy = "mount cgroup v2 at /sys/fs/cgroup, or the v1 memory, pids and cpu controllers"
    found = [finding("cgroups", layout != "none", f"layout {layout}", remedy)]
    if layout == "v1":
        memsw = Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        swap_used = _swap_total() > 0
        found.append(finding(
            "swap limit", memsw or not swap_used,
            "memory+swap limited (memsw)" if memsw else
            ("no swap accounting, but no swap is active" if not swap_used
             else "swap is active and not limited"),
            "boot with swapaccount=1 or turn swap off", required=swap_used))
        found.append(finding("freezer", Path("/sys/fs/cgroup/freezer").is_dir(),
                              "used to stop fork bombs while killing them",
                              "mount the v1 freezer controller", required=False))
    return found


def probe_image(backend: Backend, rootfs: Path, image: str) -> Finding:
    """The end-to-end probe run on an image's tree (``stockade doctor --image``): every
    control holds there too (the probe needs a shell, id, grep, hostname, tr, touch, ls, wc
    and unshare in the image)."""
    return _probe(backend, rootfs, f"end-to-end probe on {image}")


def _probe(backend: Backend, rootfs: Path | None = None,
           control: str = "end-to-end probe") -> Finding:
    job = f"doctor-{uuid.uuid4().hex[:8]}"
    out = bytearray()
    try:
        box = backend.prepare(SandboxRequest(job, 0.5, 256 << 20, 64, 16 << 20, 16 << 20, None,
                                             rootfs=rootfs))
        try:
            exit = box.run(StepRun("probe", PROBE_SCRIPT,
                                   {"PATH": "/usr/bin:/bin", "EXPECT_HOST": job}, 30), out.extend)
        finally:
            leftovers = box.teardown()
    except StockadeError as e:
        said = out.decode(errors="replace").strip().splitlines()
        message = e.message.removesuffix(SEE_LOG)  # (no log here: its last line is quoted)
        return finding(control, False, message + (f": {said[-1][:300]}" if said else ""),
                       e.hint or "see the checks above")
    text = out.decode(errors="replace").strip()
    ok = exit.exit_code == 0 and "PROBE-OK" in text and not leftovers
    detail = ("a probe job saw uid 1000, no capabilities, no_new_privs, seccomp, fresh "
              "namespaces, read-only root; nothing was left behind") if ok else (
        text.splitlines()[-1] if text else f"exit {exit.exit_code}") + (
        f"; leftovers: {leftovers}" if leftovers else "")
    return finding(control, ok, detail, "see the failing control above")


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def _swap_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
