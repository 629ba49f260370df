"""Syscalls the seccomp filter and the namespaces refuse, each attempted from inside a job."""

from __future__ import annotations

import platform

import pytest

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)

ARCH = platform.machine()
# (name, x86_64 number, aarch64 number, arguments)
SYSCALLS = [
    ("mount", 165, 40, "0, 0, 0, 0, 0"),
    ("unshare_user", 272, 97, "0x10000000"),
    ("unshare_net", 272, 97, "0x40000000"),
    ("setns", 308, 268, "0, 0"),
    ("keyctl", 250, 219, "0, 0, 0, 0, 0"),
    ("add_key", 248, 217, "0, 0, 0, 0, 0"),
    ("bpf", 321, 280, "0, 0, 0"),
    ("perf_event_open", 298, 241, "0, 0, -1, -1, 0"),
    ("userfaultfd", 323, 282, "0"),
    ("io_uring_setup", 425, 425, "1, 0"),
    ("open_by_handle_at", 304, 265, "0, 0, 0"),
    ("kexec_load", 246, 104, "0, 0, 0, 0"),
    ("init_module", 175, 105, "0, 0, 0"),
    ("pivot_root", 155, 41, "0, 0"),
    ("chroot", 161, 51, "0"),
    ("clone_newuser", 56, 220, "0x10000011, 0, 0, 0, 0"),
]


@pytest.mark.parametrize("name, x86, arm, args", SYSCALLS, ids=[s[0] for s in SYSCALLS])
def test_refused_syscall(hostile, name: str, x86: int, arm: int, args: str) -> None:
    nr = {"x86_64": x86, "aarch64": arm}[ARCH]
    run = hostile(f"""
        python3 - <<'PY'
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.syscall({nr}, *[ctypes.c_long(a) for a in ({args},)])
        if r == 0 and "{name}".startswith("clone"):
            os._exit(0)  # the child of a clone that should never have happened
        print("RESULT {name}", r, ctypes.get_errno())
        PY
    """)
    assert f"RESULT {name} -1 1" in run.log, run.log  # -1 with EPERM


def test_unshare_command_cannot_make_namespaces(hostile) -> None:
    run = hostile("for f in -U -m -n -p -r; do unshare $f true 2>&1 && echo ALLOWED $f; done; "
                  "echo DONE")
    assert "DONE" in run.log and "ALLOWED" not in run.log


@pytest.mark.skipif(ARCH != "x86_64", reason="the 32-bit int 0x80 ABI exists on x86_64 only")
@pytest.mark.host_image_only  # (it compiles its probe with the host's gcc)
def test_32bit_syscall_abi_kills_the_process(hostile) -> None:
    run = hostile("""
        cat > /tmp/x32.c <<'C'
        int main(void) { long r; __asm__ volatile ("int $0x80" : "=a"(r) : "a"(20L)); return 0; }
        C
        gcc -o /tmp/x32 /tmp/x32.c
        set +e
        /tmp/x32
        echo "EXIT $?"
    """)
    assert "EXIT 159" in run.log  # 128 + SIGSYS: the filter killed it


def test_cgroup_namespace_hides_the_host_hierarchy(hostile) -> None:
    run = hostile("cat /proc/self/cgroup; test -e /sys/fs/cgroup && echo SEES-CGROUPFS; "
                  "echo DONE")
    assert "DONE" in run.log and "SEES-CGROUPFS" not in run.log
    assert "stockade" not in run.output("probe")
