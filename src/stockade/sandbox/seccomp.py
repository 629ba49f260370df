"""Compiling the seccomp profile to BPF with libseccomp, once per process (cached on disk).

The BPF program is what bwrap's ``--seccomp FD`` loads right before it executes the step, after
``PR_SET_NO_NEW_PRIVS``. It is compiled for the native architecture only (x86_64 or aarch64);
on any other architecture stockade refuses to run jobs rather than run them unfiltered.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stockade.errors import SandboxError
from stockade.hashing import sha256

SUPPORTED_ARCHES = ("x86_64", "aarch64")
_PROFILE_SOURCE = Path(__file__).with_name("seccomp_profile.py")
_PROFILE_MODULE = "stockade.sandbox.seccomp_profile"


def _source_digest(path: Path) -> bytes:
    try:
        return sha256(path.read_bytes()).digest()
    except OSError:  # installed without sources
        return b""


_COMPILER = _source_digest(Path(__file__))  # this module's code, as it was when imported


def machine() -> str:
    """The host architecture as ``uname -m`` prints it."""
    return os.uname().machine


def compile_bpf(profile: Any = None) -> bytes:
    """Compile ``profile`` (default: the ``seccomp_profile`` module) for this machine and
    return the BPF program."""
    if profile is None:
        from stockade.sandbox import seccomp_profile as profile
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
    f = sc.SyscallFilter(sc.ERRNO(profile.REFUSED_ERRNO))
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in profile.ALLOW:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if nr >= 0:  # names of other architectures resolve to negative pseudo numbers
            f.add_rule(sc.ALLOW, nr)
    _add_conditional(sc, f, profile)
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


def _add_conditional(sc: Any, f: Any, profile: Any) -> None:
    for rule in profile.CONDITIONAL:
        action = sc.ALLOW if rule.errno is None else sc.ERRNO(rule.errno)
        if rule.condition is None:
            f.add_rule(action, rule.syscall)
            continue
        c = rule.condition
        arg = (sc.Arg(c.arg, sc.MASKED_EQ, c.value, c.value_two) if c.op == "MASKED_EQ"
               else sc.Arg(c.arg, getattr(sc, c.op), c.value))
        f.add_rule(action, rule.syscall, arg)


def _profile_and_key() -> tuple[Callable[[], Any], str]:
    """How to get the profile, and the cache key of its filter: both from the same bytes of
    its source, read (not imported: a job whose filter is cached imports no profile) and, on
    a miss, executed as read, so that a process that imported an older profile before an
    upgrade still caches what the key names; from the imported module's values if the
    source is not installed. The key also names the machine and this compiler's code."""
    try:
        source = _PROFILE_SOURCE.read_bytes()
    except OSError:
        from stockade.sandbox import seccomp_profile as module

        text = repr((module.ALLOW, module.REFUSED, module.CONDITIONAL, module.REFUSED_ERRNO))
        return (lambda: module), _key(text.encode())

    def profile() -> Any:
        namespace: dict[str, Any] = {"__name__": _PROFILE_MODULE}
        exec(compile(source, str(_PROFILE_SOURCE), "exec"), namespace)
        return SimpleNamespace(**namespace)

    return profile, _key(source)


def _key(profile: bytes) -> str:
    return sha256(b"\0".join((machine().encode(), _COMPILER, profile))).hexdigest()[:16]


def load_bpf(cache_dir: Path) -> bytes:
    """The compiled filter, from ``cache_dir`` when this exact profile was compiled before."""
    profile, key = _profile_and_key()
    path = cache_dir / f"seccomp-{machine()}-{key}.bpf"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SandboxError(f"cannot read the seccomp cache {path}: {e.strerror}") from e
    bpf = compile_bpf(profile())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_bytes(bpf)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a cache we cannot write only costs time
    return bpf
