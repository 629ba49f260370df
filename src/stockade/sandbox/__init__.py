"""Execution engines behind one :class:`~stockade.sandbox.interface.Backend` protocol.

Backends are listed explicitly in :data:`BACKENDS` (no import-time registration). ``bwrap`` is
the default and only backend today: hardened bubblewrap sandboxes in per-job cgroups with a
libseccomp filter. ``stockade doctor`` reports what each control needs and whether it is active.
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


BACKENDS = {"bwrap": _bwrap}


def get_backend(name: str, settings: Settings) -> Backend:
    """The backend called ``name``."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown sandbox backend {name!r}",
                         hint=f"choose one of {', '.join(BACKENDS)}") from None
    return factory(settings)
