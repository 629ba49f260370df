"""Reading an image's dpkg database and os-release from an unpacked tree: what dpkg lists as
present (binNMUs, sources with their own versions, distroless's status.d), and the tree
treated as hostile (links anywhere on the way, FIFOs, directories, huge or garbage files)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from stockade.image.packages import (
    MAX_DATABASE_BYTES,
    MAX_PACKAGES,
    Distribution,
    Package,
    UnreadablePackages,
    distribution,
    installed_packages,
    parse_os_release,
    read_contents,
)

HOST_STATUS = Path("/var/lib/dpkg/status")
DEBIAN_RELEASE = b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n' \
                 b"VERSION_CODENAME=bookworm\n"


def _tree(tmp: Path, status: bytes | None = None) -> Path:
    tree = tmp / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "usr/lib/os-release").write_bytes(DEBIAN_RELEASE)
    (tree / "etc/os-release").symlink_to("../usr/lib/os-release")  # as Debian has it
    if status is not None:
        (tree / "var/lib/dpkg/status").write_bytes(status)
    return tree


def _paragraph(name: str, version: str, status: str = "install ok installed",
               source: str | None = None, arch: str = "amd64") -> str:
    lines = [f"Package: {name}", f"Status: {status}", "Priority: optional",
             f"Architecture: {arch}", f"Version: {version}",
             "Description: a package", " with a long description", " ."]
    if source:
        lines.insert(3, f"Source: {source}")
    return "\n".join(lines) + "\n\n"


def test_the_hosts_own_database_is_read_as_dpkg_lists_it(tmp_path: Path) -> None:
    tree = _tree(tmp_path, HOST_STATUS.read_bytes())
    contents = read_contents(tree)
    listed = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Package} "
                             "${Version} ${Architecture} ${source:Package} "
                             "${source:Version}\n"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    expected = sorted(Package(*line.split()[1:]) for line in listed
                      if line.split()[0] not in ("not-installed", "config-files"))
    assert sorted(contents.packages) == expected
    assert contents.distribution == Distribution("debian", "12", "bookworm",
                                                 "Debian GNU/Linux 12 (bookworm)")
    assert contents.distribution.osv_ecosystems == ("Debian:12", "Debian")


def test_sources_binnmus_and_states(tmp_path: Path) -> None:
    status = "".join([
        _paragraph("bash", "5.2.15-2+b2", source="bash (5.2.15-2)"),
        _paragraph("bsdutils", "1:2.38.1-5+deb12u1", source="util-linux (2.38.1-5+deb12u1)"),
        _paragraph("libc6", "2.36-9+deb12u4", source="glibc"),
        _paragraph("libc6", "2.36-9+deb12u4", source="glibc", arch="i386"),
        _paragraph("zlib1g", "1:1.2.13.dfsg-1"),
        _paragraph("gone", "1.0-1", status="deinstall ok config-files"),
        _paragraph("never", "1.0-1", status="purge ok not-installed"),
        _paragraph("held", "1.0-1", status="hold ok installed"),
        _paragraph("halfway", "1.0-1", status="install reinstreq half-configured"),
        "Package: no-status\nVersion: 1.0\nArchitecture: all\n",
    ])
    packages = {(p.name, p.architecture): p for p in installed_packages(_tree(tmp_path,
                                                                             status.encode()))}
    assert packages[("bash", "amd64")] == Package("bash", "5.2.15-2+b2", "amd64", "bash",
                                                  "5.2.15-2")
    assert packages[("bsdutils", "amd64")].source_version == "2.38.1-5+deb12u1"
    assert packages[("libc6", "amd64")].source == "glibc"
    assert packages[("libc6", "amd64")].source_version == "2.36-9+deb12u4"
    assert ("libc6", "i386") in packages
    assert packages[("zlib1g", "amd64")].source == "zlib1g"
    assert {"held", "halfway"} <= {name for name, _ in packages}
    assert not {"gone", "never", "no-status"} & {name for name, _ in packages}


def test_distroless_status_d(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    status_d = tree / "var/lib/dpkg/status.d"
    status_d.mkdir()
    (status_d / "libc6").write_text("Package: libc6\nVersion: 2.36-9+deb12u4\n"
                                    "Architecture: amd64\nSource: glibc\n")
    (status_d / "libc6.md5sums").write_text("d41d8cd98f00b204e9800998ecf8427e  lib/x\n")
    (status_d / "tzdata").write_text("Package: tzdata\nVersion: 2024a-0+deb12u1\n"
                                     "Architecture: all\n")
    (status_d / "escape").symlink_to("/var/lib/dpkg/status")
    names = [(p.name, p.source) for p in installed_packages(tree)]
    assert names == [("libc6", "glibc"), ("tzdata", "tzdata")]


def test_an_image_without_a_database_or_release_has_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "empty"
    tree.mkdir()
    assert read_contents(tree).packages == ()
    assert distribution(tree) == Distribution()
    assert Distribution().osv_ecosystems == ()
    assert Distribution("ubuntu", "22.04").osv_ecosystems == ()
    assert Distribution("debian").osv_ecosystems == ("Debian",)


@pytest.mark.parametrize("trick", ["status", "dpkg", "lib", "var"])
def test_a_link_anywhere_on_the_way_is_refused_not_followed(tmp_path: Path,
                                                             trick: str) -> None:
    tree = _tree(tmp_path)
    secret = tmp_path / "secret"
    (secret / "lib/dpkg").mkdir(parents=True)
    (secret / "lib/dpkg/status").write_text(_paragraph("leaked", "1.0-1"))
    target = {"status": secret / "lib/dpkg/status", "dpkg": secret / "lib/dpkg",
              "lib": secret / "lib", "var": secret}[trick]
    where = {"status": "var/lib/dpkg/status", "dpkg": "var/lib/dpkg", "lib": "var/lib",
             "var": "var"}[trick]
    _replace(tree / where, target)
    with pytest.raises(UnreadablePackages, match="link") as refused:
        installed_packages(tree)
    assert "leaked" not in refused.value.diagnostics()


def _replace(path: Path, target: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def test_a_fifo_a_directory_or_a_huge_file_is_refused_without_hanging(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    status = tree / "var/lib/dpkg/status"
    os.mkfifo(status)
    done = threading.Event()

    def read() -> None:
        with pytest.raises(UnreadablePackages, match="not a regular file"):
            installed_packages(tree)
        done.set()

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(5)
    assert done.is_set(), "reading a FIFO blocked"
    status.unlink()
    status.mkdir()
    with pytest.raises(UnreadablePackages, match="not a regular file"):
        installed_packages(tree)
    status.rmdir()
    with status.open("wb") as f:
        f.truncate(MAX_DATABASE_BYTES + 1)  # (sparse: nothing is written)
    with pytest.raises(UnreadablePackages, match="larger than"):
        installed_packages(tree)


@pytest.mark.parametrize(("status", "problem"), [
    (b"\x00\x01\x02garbage\xff\xfe\n", "line 1 is not a field"),
    (_paragraph("ok", "1.0-1").encode() + b"no colon here\n", "line 10 is not a field"),
    (_paragraph("bad", "1.0 beta").encode(), "Version is not a Debian version"),
    (_paragraph("Bad_Name", "1.0").encode(), "name is not a Debian package name"),
    (_paragraph("x", "1.0", arch="amd64; rm -rf").encode(), "Architecture is malformed"),
    (_paragraph("x", "1.0", source="glibc (2.36 beta)").encode(), "Source is malformed"),
    (_paragraph("x", "1.0", source="glibc (not:a-version-)").encode(), "Source version"),
    (_paragraph("x", "").encode(), "Version is not"),
])
def test_garbage_is_refused_with_a_clear_error_quoting_nothing(
        tmp_path: Path, status: bytes, problem: str) -> None:
    with pytest.raises(UnreadablePackages, match=problem) as refused:
        installed_packages(_tree(tmp_path, status))
    text = refused.value.diagnostics()
    assert "garbage" not in text and "rm -rf" not in text and "beta" not in text
    assert refused.value.exit_code == 1


def test_the_number_of_packages_is_bounded(tmp_path: Path) -> None:
    status = "".join(f"Package: p{n}\nStatus: install ok installed\nVersion: 1\n"
                     f"Architecture: all\n\n" for n in range(MAX_PACKAGES + 1))
    with pytest.raises(UnreadablePackages, match="more than"):
        installed_packages(_tree(tmp_path, status.encode()))


def test_os_release_values_are_tokens_or_left_out() -> None:
    assert parse_os_release(b"ID='debian'\nVERSION_ID=12\n") == Distribution("debian", "12")
    hostile = parse_os_release(b'ID="debian; echo"\nVERSION_ID="12\\n"\n'
                               b'PRETTY_NAME="\x1b[31mred\x1b[0m"\n' + b"x" * 100_000)
    assert hostile.id == "" and hostile.version_id == ""
    assert "\x1b" not in hostile.pretty_name
    assert parse_os_release(b"\xff\xfe") == Distribution()


def test_an_os_release_link_out_of_the_tree_is_not_followed(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "usr/lib/os-release").unlink()
    (tree / "usr/lib/os-release").symlink_to("/etc/os-release")  # the host's
    assert distribution(tree) == Distribution()
