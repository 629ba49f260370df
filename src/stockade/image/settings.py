"""The operator's registry settings as the registry client takes them (read when an image is
needed, so that a mistake there is reported to whoever needs images, with the fix)."""

from __future__ import annotations

import base64
import binascii
import json
import os

from stockade.config import Settings
from stockade.errors import ConfigError
from stockade.image.registry import RegistryConfig

MAX_AUTH_FILE = 1 << 20


def registry_config(settings: Settings) -> RegistryConfig:
    """:class:`RegistryConfig` from ``insecure_registries``, ``registry_mirrors``,
    ``registry_auth_file``, ``registry_ca_file`` and ``registry_auxiliary_hosts``."""
    mirrors: dict[str, tuple[str, ...]] = {}
    for entry in settings.registry_mirrors:
        origin, sep, mirror = entry.partition("=")
        if not sep or not origin.strip() or not mirror.strip() or "/" in entry:
            raise ConfigError(f"registry_mirrors: {entry[:100]!r} is not REGISTRY=MIRROR",
                              hint="e.g. registry.example=mirror.internal:5000 (hosts only)")
        mirrors[origin.strip()] = (*mirrors.get(origin.strip(), ()), mirror.strip())
    ca_file = settings.registry_ca_file or None
    if ca_file and not os.access(ca_file, os.R_OK):
        raise ConfigError(f"registry_ca_file {ca_file!r} cannot be read",
                          hint="point it at a PEM bundle of the registries' CA certificates")
    return RegistryConfig(credentials=_credentials(settings.registry_auth_file),
                          insecure=frozenset(settings.insecure_registries), mirrors=mirrors,
                          ca_file=ca_file,
                          auxiliary_hosts=frozenset(settings.registry_auxiliary_hosts))


def _credentials(path: str) -> dict[str, tuple[str, str]]:
    """``{host: (user, password)}`` from a docker-style ``config.json``."""
    if not path:
        return {}
    hint = ('write {"auths": {"registry.example": {"auth": "<base64 of user:password>"}}} '
            "(a file only root can read)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_AUTH_FILE + 1)
        if os.stat(path).st_mode & 0o077:
            raise ConfigError(f"registry_auth_file {path!r} may be read by others than its "
                              "owner", hint=f"chmod 600 {path}")
        doc = json.loads(raw) if len(raw) <= MAX_AUTH_FILE else None
    except OSError as e:
        raise ConfigError(f"registry_auth_file {path!r}: {e.strerror}", hint=hint) from None
    except (ValueError, RecursionError):
        doc = None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise ConfigError(f"registry_auth_file {path!r} has no \"auths\" object", hint=hint)
    found = {}
    for host, entry in auths.items():
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode(
            ).partition(":")
        except (KeyError, TypeError, binascii.Error, UnicodeDecodeError, ValueError):
            sep = ""
        if not sep or not user:
            raise ConfigError(f"registry_auth_file: the entry of {str(host)[:100]!r} has no "
                              "usable \"auth\"", hint=hint)
        found[str(host)] = (user, password)
    return found
