"""Compiling the seccomp profile to BPF with libseccomp, once per process (cached on disk).

The BPF program is what bwrap's ``--seccomp FD`` loads right before it executes the step, after
``PR_SET_NO_NEW_PRIVS``. It is compiled for the native architecture only (x86_64 or aarch64);
on any other architecture stockade refuses to run jobs rather than run them unfiltered.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

from stockade.errors import SandboxError
from stockade.sandbox import seccomp_profile as profile

SUPPORTED_ARCHES = ("x86_64", "aarch64")


def machine() -> str:
    """The host architecture as ``uname -m`` prints it."""
    return os.uname().machine


def compile_bpf() -> bytes:
    """Compile the profile for this machine and return the BPF program."""
    arch = machine()
    if arch not in SUPPORTED_ARCHES:
        raise SandboxError(
            f"no seccomp profile for architecture {arch}",
            hint=f"stockade runs jobs on {' and '.join(SUPPORTED_ARCHES)} only",
        )
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:
        raise SandboxError(
            f"libseccomp is not usable: {e}",
            hint="install libseccomp2 (apt-get install libseccomp2)",
        ) from e
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in profile.ALLOW:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if nr >= 0:  # names of other architectures resolve to negative pseudo numbers
            f.add_rule(sc.ALLOW, nr)
    _add_conditional(sc, f)
    r, w = os.pipe()
    try:
        f.export_bpf(os.fdopen(os.dup(w), "wb"))
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as pipe:
            r = -1
            return pipe.read()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def _add_conditional(sc: Any, f: Any) -> None:
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, profile.CLONE_NS_FLAGS, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # libc falls back to clone(), filtered above
    f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.NE, profile.AF_VSOCK))
    for value in profile.PERSONALITY_ALLOWED:
        f.add_rule(sc.ALLOW, "personality", sc.Arg(0, sc.EQ, value))
    f.add_rule(sc.ALLOW, "ioctl")


def _cache_key() -> str:
    text = repr((machine(), profile.ALLOW, profile.REFUSED, profile.CLONE_NS_FLAGS,
                 profile.AF_VSOCK, profile.PERSONALITY_ALLOWED))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_bpf(cache_dir: Path) -> bytes:
    """The compiled filter, from ``cache_dir`` when this exact profile was compiled before."""
    path = cache_dir / f"seccomp-{machine()}-{_cache_key()}.bpf"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SandboxError(f"cannot read the seccomp cache {path}: {e.strerror}") from e
    bpf = compile_bpf()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_bytes(bpf)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache we cannot write only costs time
    return bpf
