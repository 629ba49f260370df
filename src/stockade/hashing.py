"""SHA-256 for the paths every command takes (the audit chain, cache keys): CPython's own
implementation, which costs nothing to import, where ``hashlib`` loads OpenSSL (~4 ms of every
``stockade run`` on these machines). Large data (uploads, layers, artifacts) goes through
``hashlib``, which is faster per byte."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import sha256
else:
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:  # pragma: no cover (the interpreter's own, elsewhere)
        try:
            from _sha2 import sha256  # CPython 3.12 and later
        except ImportError:
            from hashlib import sha256

__all__ = ["sha256"]
