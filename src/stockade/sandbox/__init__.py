"""Execution engines behind one :class:`~stockade.sandbox.interface.Backend` protocol.

Backends are listed explicitly in :data:`BACKENDS` (no import-time registration): ``bwrap``
(the default: hardened bubblewrap sandboxes in per-job cgroups with a libseccomp filter),
``oci`` (a runc container per step, the same hardening in an OCI runtime spec) and ``runsc``
(the same bundle run by gVisor, a kernel of its own between the job and the host's: the only
backend that takes jobs with ``isolation: strong``). The operator chooses one per runner
(``sandbox_backend``); ``stockade doctor`` reports what each needs and whether it is usable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stockade.errors import UsageError

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.sandbox.interface import Backend


def _bwrap(settings: Settings) -> Backend:
    from stockade.sandbox.bwrap import BwrapBackend

    return BwrapBackend(settings)


def _oci(settings: Settings) -> Backend:
    from stockade.sandbox.oci import RUNC, OciBackend

    return OciBackend(settings, RUNC)


def _runsc(settings: Settings) -> Backend:
    from stockade.sandbox.oci import RUNSC, OciBackend

    return OciBackend(settings, RUNSC)


BACKENDS = {"bwrap": _bwrap, "oci": _oci, "runsc": _runsc}


def get_backend(name: str, settings: Settings) -> Backend:
    """The backend called ``name``."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown sandbox backend {name!r}",
                         hint=f"choose one of {', '.join(BACKENDS)}") from None
    return factory(settings)
