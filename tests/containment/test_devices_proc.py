"""Hostile jobs against devices, /proc and /sys, and the host's identity."""

from __future__ import annotations

import socket
import subprocess

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)


def test_dev_is_minimal_and_read_only(hostile) -> None:
    run = hostile("""
        ls /dev
        for d in sda vda mem kmem port kmsg net/tun fuse loop0 nvme0; do
          test -e /dev/$d && echo PRESENT $d
        done
        mknod /tmp/mem c 1 1 2>/dev/null && echo MKNOD-OK
        touch /dev/evil 2>/dev/null && echo DEV-WRITABLE
        echo DONE
    """)
    assert "DONE" in run.log
    assert "PRESENT" not in run.log and "MKNOD-OK" not in run.log and "DEV-WRITABLE" not in run.log


def test_proc_sys_and_sysrq_are_not_writable(hostile) -> None:
    run = hostile("""
        echo evil > /proc/sys/kernel/hostname 2>/dev/null && echo WROTE-HOSTNAME
        echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo WROTE-VM
        echo b > /proc/sysrq-trigger 2>/dev/null && echo WROTE-SYSRQ
        echo 0 > /proc/sys/kernel/randomize_va_space 2>/dev/null && echo WROTE-ASLR
        cat /proc/kcore >/dev/null 2>&1 && echo READ-KCORE
        echo DONE
    """)
    assert "DONE" in run.log and "WROTE" not in run.log and "READ-KCORE" not in run.log


def test_hostname_change_stays_inside(hostile, host) -> None:
    before = socket.gethostname()
    run = hostile("hostname evil-host 2>&1 || echo REFUSED; hostname")
    assert run.result["job_id"] in run.log
    assert socket.gethostname() == before


def test_sysfs_writes_are_impossible(hostile) -> None:
    run = hostile("""
        mkdir -p /tmp/sys
        mount -t sysfs sysfs /tmp/sys 2>/dev/null && echo MOUNTED-SYSFS
        echo 1 > /sys/kernel/mm/ksm/run 2>/dev/null && echo WROTE-SYS
        echo DONE
    """)
    assert "DONE" in run.log and "MOUNTED-SYSFS" not in run.log and "WROTE-SYS" not in run.log


def test_no_extra_file_descriptors_are_inherited(hostile) -> None:
    run = hostile("ls -l /proc/self/fd/ | tail -n +2")
    lines = [ln for ln in run.output("probe").splitlines() if "->" in ln]
    targets = [ln.split("->")[1].strip() for ln in lines]
    assert len(targets) == 4, targets  # stdin, stdout, stderr and ls's own directory fd
    assert not any("cgroup" in t or "memfd" in t for t in targets)


def test_host_sysv_ipc_is_invisible(hostile) -> None:
    made = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True)
    shm_id = made.stdout.split(":")[-1].strip()
    try:
        run = hostile(f"ipcs -m; ipcrm -m {shm_id} 2>&1 || echo CANNOT-REMOVE; echo DONE")
        assert "DONE" in run.log and "CANNOT-REMOVE" in run.log
        listed = subprocess.run(["ipcs", "-m", "-i", shm_id], capture_output=True, text=True)
        assert listed.returncode == 0  # still there on the host
    finally:
        subprocess.run(["ipcrm", "-m", shm_id], check=False)
