"""Hostile jobs against the host's files."""

from __future__ import annotations

from pathlib import Path

import pytest

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)


def test_cannot_read_the_host_canary(hostile, host) -> None:
    run = hostile('cat "$CANARY" || echo BLOCKED; ls /root || echo NO-ROOT')
    assert run.rc == 0 and "BLOCKED" in run.log and "NO-ROOT" in run.log


@pytest.mark.host_image_only  # (an image has its own accounts and directories)
def test_host_etc_is_not_visible(hostile) -> None:
    run = hostile("""
        test ! -e /etc/shadow && echo NO-SHADOW
        test ! -e /etc/ssh && echo NO-SSH
        grep -c . /etc/passwd
        cat /etc/passwd
    """)
    assert "NO-SHADOW" in run.log and "NO-SSH" in run.log
    assert "root:" not in run.log  # only the job user and nobody


@pytest.mark.host_image_only  # (an image has its own accounts and directories)
def test_host_directories_are_absent(hostile) -> None:
    run = hostile("for d in /root /home /var /run/systemd /srv /opt /boot /sys; do "
                  "test -e $d && echo PRESENT $d; done; echo DONE")
    assert "DONE" in run.log and "PRESENT" not in run.log


def test_root_and_usr_are_read_only(hostile) -> None:
    run = hostile("""
        for p in /evil /usr/evil /usr/bin/evil /etc/evil /bin/evil; do
          touch $p 2>/dev/null && echo WROTE $p
        done
        echo 'x' >> /etc/passwd 2>/dev/null && echo WROTE passwd
        echo DONE
    """)
    assert "DONE" in run.log and "WROTE" not in run.log
    assert not Path("/usr/evil").exists() and not Path("/evil").exists()


def test_users_workspace_is_never_modified(hostile, tmp_path: Path) -> None:
    ws = tmp_path / "user-ws"
    ws.mkdir()
    (ws / "keep.txt").write_text("original\n")
    run = hostile("rm -rf ./*; echo changed > new.txt; ls -la", workspace=ws)
    assert run.rc == 0
    assert (ws / "keep.txt").read_text() == "original\n"
    assert sorted(p.name for p in ws.iterdir()) == ["keep.txt"]


def test_suid_binaries_are_inert(hostile) -> None:
    run = hostile("""
        set +e  # (an image may lack mount)
        ls -l /usr/bin/mount /usr/bin/su
        mkdir -p /tmp/m
        /usr/bin/mount -t tmpfs none /tmp/m && echo MOUNTED
        su -c id root </dev/null && echo BECAME-ROOT
        echo "euid $(python3 -c 'import os; print(os.geteuid())')"
        echo DONE
    """)
    assert "DONE" in run.log and "MOUNTED" not in run.log and "BECAME-ROOT" not in run.log
    assert "euid 1000" in run.log
