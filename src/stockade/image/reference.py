"""Image references as a job spec or an operator writes them: ``REGISTRY/REPO@sha256:DIGEST``
(pinned) or ``REGISTRY/REPO:TAG`` (resolved to a digest once, at admission).

The registry is always named (no implicit Docker Hub: a job cannot make the runner talk to a
registry the operator did not mean): a host with a dot or a port, or ``localhost``. Names
follow the OCI distribution spec's grammar, checked strictly, so that a reference can be put
into a URL path and a cache path as it is.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from stockade.errors import UsageError

_HOST = re.compile(r"^(?:localhost|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                   r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)"
                   r"(?::[0-9]{1,5})?$")
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_REFERENCE = 512
EXAMPLE = "registry.example:5000/team/base@sha256:<64 hex> or registry.example/team/base:1.2"


class BadReference(UsageError):
    """Not an image reference; ``why`` says what is wrong with it."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message, hint=f"write e.g. {EXAMPLE}")
        self.why = why


class ImageRef(NamedTuple):
    """A parsed reference: ``tag`` or ``digest`` (or both: a tag pinned to a digest)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def with_digest(self, digest: str) -> ImageRef:
        """The same image pinned to ``digest``."""
        return self._replace(digest=digest)

    def __str__(self) -> str:
        base = f"{self.registry}/{self.repository}"
        if self.digest:
            return f"{base}@{self.digest}"
        return f"{base}:{self.tag}"


def parse_reference(text: str) -> ImageRef:
    """``text`` as an :class:`ImageRef` (UsageError naming the problem otherwise)."""
    if not text or len(text) > MAX_REFERENCE or not text.isascii() or not text.isprintable() \
            or any(c.isspace() for c in text):
        raise _bad(text, f"an image reference is printable ASCII, at most {MAX_REFERENCE} "
                         "characters")
    rest, at, pinned = text.partition("@")
    digest = pinned if at else None
    if digest is not None and not _DIGEST.match(digest):
        raise _bad(text, "the digest is not sha256:<64 lowercase hex>")
    registry, sep, path = rest.partition("/")
    if not sep or not _HOST.match(registry) or ("." not in registry and ":" not in registry
                                                 and registry != "localhost"):
        raise _bad(text, "name the registry first (a host with a dot or a port, or localhost)")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise _bad(text, "the tag is not [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
    if not _REPO.match(path) or len(path) > 255:
        raise _bad(text, "the repository is lowercase letters, digits and . _ - separators, "
                         "in /-separated parts")
    if tag is None and digest is None:
        raise _bad(text, "name a tag or a digest (there is no implicit :latest)")
    return ImageRef(registry, path, tag, digest)


def _bad(text: str, why: str) -> BadReference:
    from stockade.text import escape_controls

    return BadReference(f"{escape_controls(text[:200])!r} is not an image reference: {why}",
                        why)
