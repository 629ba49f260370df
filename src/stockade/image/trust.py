"""The operator's image signature policy: which public keys are trusted to sign the images of
which registries and repositories (``image_trusted_keys``), and whether every job's image must
be signed (``require_signed_images``).

An entry is ``PREFIX=PATH``: ``PATH`` a PEM public key (``cosign.pub``), ``PREFIX`` ``*``
(every registry), a registry (``registry.example:5000``) or a repository prefix
(``registry.example/team``: the repository ``team`` and those under ``team/``, never
``teams``). The most specific prefix that covers an image's repository decides, alone: its
keys (one entry per key; several entries with the same prefix trust each of their keys, for
a key rotation) are the only ones accepted for that image, so a team's own key is not
overridden by a registry-wide one and the other way round. An image covered by a prefix must
be signed by one of its keys, whatever ``require_signed_images`` says; with it, an image no
prefix covers is refused too. Only the operator writes these settings; a job never can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from stockade.config import Settings
from stockade.errors import ConfigError
from stockade.image.cosign_keys import KeyFileError, PublicKey, load_public_key, read_key_file
from stockade.image.reference import BadReference, ImageRef, parse_reference

if TYPE_CHECKING:
    from stockade.image.registry import Registry

_HINT = ("write PREFIX=PATH entries: PREFIX is *, a registry (registry.example:5000) or a "
         "repository prefix (registry.example/team), PATH a PEM public key (cosign.pub)")


class TrustRule(NamedTuple):
    """The keys trusted for the repositories under ``prefix``."""

    prefix: str  # "*", "host[:port]" or "host[:port]/path"
    keys: tuple[PublicKey, ...]

    @property
    def specificity(self) -> int:
        """0 for ``*``, 1 for a registry, one more per path component."""
        return 0 if self.prefix == "*" else 1 + self.prefix.count("/")

    def covers(self, ref: ImageRef) -> bool:
        """Whether ``ref``'s repository is under this prefix."""
        if self.prefix == "*":
            return True
        host, _, path = self.prefix.partition("/")
        return host == ref.registry.lower() and (
            not path or ref.repository == path or ref.repository.startswith(path + "/"))


class TrustPolicy(NamedTuple):
    """The trusted keys by prefix, and whether an image no prefix covers is refused."""

    rules: tuple[TrustRule, ...] = ()
    require_signed: bool = False

    def rule_for(self, ref: ImageRef) -> TrustRule | None:
        """The most specific rule covering ``ref`` (None: no key is trusted for it)."""
        covering = [rule for rule in self.rules if rule.covers(ref)]
        return max(covering, key=lambda rule: rule.specificity, default=None)


class Verdict(NamedTuple):
    """What the policy says of a job's image: a note for the job's log, an audit event, and
    why it is refused (None: it may run)."""

    note: str | None
    event: tuple[str, dict[str, Any]] | None
    refusal: str | None = None


def signature_verdict(policy: TrustPolicy, registry: Registry, ref: ImageRef) -> Verdict:
    """The verdict on pinned ``ref``: verified by one of the keys the policy trusts for its
    repository, or refused (``image.unverified``, with the problem); not checked when no key
    covers it and signatures are not required (ImageUnavailable if the registry and its
    mirrors cannot tell)."""
    from stockade.image.errors import ImageRefused
    from stockade.image.signing import verify_image

    rule = policy.rule_for(ref)
    if rule is None:
        if policy.require_signed:
            return _refused(str(ref), "no-trusted-key", f"image {ref}: no key in "
                            "image_trusted_keys covers its repository and "
                            "require_signed_images is on")
        return Verdict("image signature not checked: no key in image_trusted_keys covers "
                       "its repository" if policy.rules else None, None)
    try:
        verified = verify_image(registry, ref, rule.keys)
    except ImageRefused as e:  # (a payload whose bytes do not match its digest, too)
        return _refused(str(ref), getattr(e, "problem", "malformed"), e.message)
    return Verdict(f"image signature verified: signed by {verified.key.describe()}, trusted "
                   f"for {rule.prefix}",
                   ("image.verified", {"image": str(ref), "key": verified.key.fingerprint,
                                       "key_file": verified.key.source,
                                       "trusted_for": rule.prefix,
                                       "payload": verified.payload_digest}))


def host_verdict(settings: Settings) -> Verdict:
    """The verdict on ``image: host``: it has no signature, refused when every image must be
    signed."""
    if settings.require_signed_images:
        return _refused("host", "unsigned", "image: host has no signature and "
                        "require_signed_images is on: name a signed image")
    return Verdict(None, None)


def _refused(image: str, problem: str, message: str) -> Verdict:
    return Verdict(None, ("image.unverified", {"image": image, "problem": problem,
                                               "message": message[:1000]}), message)


def trust_policy(settings: Settings) -> TrustPolicy:
    """The policy of ``image_trusted_keys`` and ``require_signed_images``; each key file read
    now (ConfigError naming the entry if one cannot be read or is not an ECDSA P-256 public
    key)."""
    keys: dict[str, list[PublicKey]] = {}
    loaded: dict[str, PublicKey] = {}
    for entry in settings.image_trusted_keys:
        text, sep, path = entry.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"image_trusted_keys: {entry[:200]!r} is not PREFIX=PATH",
                              hint=_HINT)
        prefix, path = _prefix(text.strip()), path.strip()
        if path not in loaded:
            loaded[path] = _load(path)
        keys.setdefault(prefix, []).append(loaded[path])
    return TrustPolicy(tuple(TrustRule(p, tuple(k)) for p, k in keys.items()),
                       settings.require_signed_images)


def _prefix(text: str) -> str:
    """``text`` checked as a prefix (the registry's name in lower case)."""
    if text == "*":
        return text
    try:  # (the reference grammar, with a repository and a tag added to make one)
        parse_reference(f"{text}:t" if "/" in text else f"{text}/x:t")
    except BadReference:
        raise ConfigError(f"image_trusted_keys: {text[:200]!r} is not *, a registry or a "
                          "repository prefix", hint=_HINT) from None
    host, sep, path = text.partition("/")
    return host.lower() + sep + path


def _load(path: str) -> PublicKey:
    try:
        return load_public_key(read_key_file(path), path)
    except KeyFileError as e:
        raise ConfigError(f"image_trusted_keys: {e.message}", hint=e.hint) from None
