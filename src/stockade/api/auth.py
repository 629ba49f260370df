"""API tokens of ``stockade server``: roles, the highest trust each may submit at, checking.

A token reads ``stk_<id>_<secret>``: ``id`` finds its row, and only the sha256 of ``secret``
(32 random bytes) is stored, compared in constant time. The token is shown once, at creation.
Roles include the ones before them: ``viewer`` reads jobs, ``submitter`` also submits,
``admin`` also administers. A submitter's jobs never get more trust than its ``max_trust``
(a token for fork pull requests submits ``untrusted`` jobs whatever the request says).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import os
import time

from stockade.api.protocol import TRUST_LEVELS
from stockade.errors import UsageError
from stockade.secrets.broker import check_refs
from stockade.store.interface import TokenRow

ROLES = ("viewer", "submitter", "admin")
# in the server's 403 answers, for the client to tell them apart (cli/remote.py)
ROLE_REFUSED = "role may not do this"
REFS_REFUSED = "may submit jobs for refs matching"
PREFIX = "stk_"


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


MAX_TTL_S = 10 * 365 * 86400.0


def new_token(name: str, role: str, max_trust: str, ttl_s: float | None,
              now: float | None = None, refs: str = "*") -> tuple[TokenRow, str]:
    """A new token's row (to store) and the token itself (to show once)."""
    if role not in ROLES:
        raise UsageError(f"{role!r} is not a role", hint=f"use one of: {', '.join(ROLES)}")
    if max_trust not in TRUST_LEVELS:
        raise UsageError(f"{max_trust!r} is not a trust level",
                         hint=f"use one of: {', '.join(TRUST_LEVELS)}")
    if not name or len(name) > 100 or not name.isascii() or not name.isprintable():
        raise UsageError("a token name is 1 to 100 printable ASCII characters")
    if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
        raise UsageError("a token's lifetime is more than 0 and at most 10 years",
                         hint="e.g. --ttl 720h")
    check_refs(refs)
    created = time.time() if now is None else now
    token_id = "t" + _b32(os.urandom(5))
    secret = _b32(os.urandom(32))
    row = TokenRow(token_id, name, role, max_trust, _digest(secret), created,
                   None if ttl_s is None else created + ttl_s, None, refs)
    return row, f"{PREFIX}{token_id}_{secret}"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split(token: str, prefix: str = PREFIX) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token (``<prefix><id>_<secret>``), else None."""
    if not token.startswith(prefix) or len(token) > 128:
        return None
    token_id, sep, secret = token[len(prefix):].partition("_")
    if not sep or not _plain(token_id) or not _plain(secret) or len(token_id) > 16:
        return None
    return token_id, secret


def refusal(row: TokenRow | None, secret: str, now: float) -> str | None:
    """Why ``row`` does not authenticate ``secret`` now (None if it does)."""
    if row is None or not hmac.compare_digest(row.secret_sha256, _digest(secret)):
        return "unknown token"
    if row.revoked_at is not None:
        return "revoked token"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired token"
    return None


def _plain(text: str) -> bool:
    return text.isascii() and text.isalnum()


def ref_allowed(row: TokenRow, ref: str) -> bool:
    """Whether jobs submitted with ``row`` may say they run ``ref``."""
    return fnmatch.fnmatchcase(ref, row.refs)


def allows(role: str, needed: str) -> bool:
    """Whether ``role`` includes ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


def capped_trust(requested: str, max_trust: str) -> str:
    """The trust a submitted job gets: what was asked, at most the token's."""
    return TRUST_LEVELS[min(TRUST_LEVELS.index(requested), TRUST_LEVELS.index(max_trust))]
