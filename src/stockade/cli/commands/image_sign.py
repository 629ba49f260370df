"""``stockade image sign|verify|generate-key-pair``: cosign-compatible keyed image signatures
(offline: no transparency log, no certificates; see ``image/signing.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.image.cosign_keys import PublicKey
    from stockade.image.reference import ImageRef
    from stockade.image.registry import Registry

ACTIONS = ("sign", "verify", "generate-key-pair")
REGISTRY_S = 600.0  # one sign or verify, all of it
PASSWORD_VARIABLE = "COSIGN_PASSWORD"  # cosign's: the same scripts work with either tool


def add_actions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The subcommands of this module."""
    sign = sub.add_parser("sign", help="sign an image with a cosign key (cosign-compatible)")
    sign.add_argument("reference", metavar="REFERENCE")
    sign.add_argument("--key", required=True, metavar="KEY",
                      help=f"the private key (cosign.key); its password from "
                           f"${PASSWORD_VARIABLE} or a prompt")
    verify = sub.add_parser("verify", help="check an image's signature")
    verify.add_argument("reference", metavar="REFERENCE")
    verify.add_argument("--key", metavar="PUB",
                        help="the public key (cosign.pub); default: the keys "
                             "image_trusted_keys trusts for the image's repository")
    generate = sub.add_parser(
        "generate-key-pair", help="make a cosign key pair",
        description=f"Write PREFIX.key (cosign's encrypted format, 0600) and PREFIX.pub; the "
                    f"password comes from ${PASSWORD_VARIABLE} (as it is, even empty) or is "
                    "asked twice on the terminal. An existing file is never overwritten.")
    generate.add_argument("--output-key-prefix", default="cosign", metavar="PREFIX",
                          help="write PREFIX.key (0600, encrypted) and PREFIX.pub "
                               "(default: cosign)")


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    actions = {"sign": _sign, "verify": _verify, "generate-key-pair": _generate}
    return actions[args.action](args)


def _sign(args: argparse.Namespace) -> int:
    from stockade.config import load_settings
    from stockade.image.cosign_keys import load_private_key, read_key_file
    from stockade.image.reference import parse_reference
    from stockade.image.signing import sign_image

    ref = parse_reference(args.reference)
    key = load_private_key(read_key_file(args.key), _password(args.key), args.key)
    # (what is there now, where the signature goes: the registry itself, not a mirror)
    registry = _registry(load_settings(), mirrors=False)
    try:
        pinned = _pinned(registry, ref)
        signed = sign_image(registry, pinned, key)
    finally:
        registry.close()
    where = f"{pinned.registry}/{pinned.repository}:{signed.tag}"
    plural = "" if signed.signatures == 1 else "s"
    if signed.pushed:
        print(f"signed {pinned}: {where} ({signed.signatures} signature{plural})")
    else:
        print(f"already signed by this key: {where} ({signed.signatures} signature{plural})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from stockade.config import load_settings
    from stockade.image.errors import ImageRefused
    from stockade.image.reference import parse_reference
    from stockade.image.signing import signature_tag, verify_image

    ref, settings = parse_reference(args.reference), load_settings()
    keys, trusted_for = _public_keys(settings, args.key, ref)
    registry = _registry(settings, mirrors=True)  # (as a runner reads it)
    try:
        pinned = _pinned(registry, ref)
        verified = verify_image(registry, pinned, keys)
    except ImageRefused as e:
        sys.stderr.write(f"stockade image verify: NOT verified: {e.diagnostics()}\n")
        return 1
    finally:
        registry.close()
    print(f"verified: {pinned}\n  signed by {verified.key.source} ({verified.key.fingerprint})"
          f"{trusted_for}\n  signature payload {verified.payload_digest} (one of "
          f"{verified.signatures} at {pinned.registry}/{pinned.repository}:"
          f"{signature_tag(str(pinned.digest))})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stockade.image.cosign_keys import generate_key_pair, key_pair_paths

    prefix = Path(args.output_key_prefix)
    key_pair_paths(prefix)  # (refused before the password is asked for)
    private, public = generate_key_pair(prefix, _password(str(prefix) + ".key", new=True))
    print(f"Private key written to {private}\nPublic key written to {public}")
    return 0


def _public_keys(settings: Settings, path: str | None, ref: ImageRef
                 ) -> tuple[tuple[PublicKey, ...], str]:
    """The keys to check with: ``--key``'s, or those the settings trust for ``ref``."""
    from stockade.errors import UsageError

    if path:
        from stockade.image.cosign_keys import load_public_key, read_key_file

        return (load_public_key(read_key_file(path), path),), ""
    from stockade.image.trust import trust_policy

    rule = trust_policy(settings).rule_for(ref)
    if rule is None:
        raise UsageError(f"no key to verify {ref} with: pass --key, or trust one for its "
                         "repository", hint="image_trusted_keys = [\"REGISTRY/REPO=PATH.pub\"] "
                                            "(see README: Signing images)")
    return rule.keys, f", trusted for {rule.prefix} (image_trusted_keys)"


def _registry(settings: Settings, mirrors: bool) -> Registry:
    from stockade.image.registry import Registry
    from stockade.image.settings import registry_config

    config = registry_config(settings)
    return Registry(config if mirrors else config._replace(mirrors={})).within(REGISTRY_S)


def _pinned(registry: Registry, ref: ImageRef) -> ImageRef:
    """``ref`` pinned: a tag resolved now, a digest checked to name a manifest there."""
    from stockade.errors import UsageError

    if not ref.digest:
        return ref.with_digest(registry.resolve(ref))
    found = registry.find_manifest(ref, ref.digest)
    if found is None or found[2] != ref.digest:
        raise UsageError(f"{ref.registry}/{ref.repository} has no manifest {ref.digest}",
                         hint="name an image the registry has (stockade image pull REFERENCE "
                              "prints its digest)")
    return ref


def _password(key: str, new: bool = False) -> bytes:
    """The key's password: ``$COSIGN_PASSWORD`` if set (even empty), else asked for on the
    terminal (twice for a new key)."""
    import getpass
    import os

    from stockade.errors import UsageError

    if PASSWORD_VARIABLE in os.environ:
        return os.environ[PASSWORD_VARIABLE].encode()
    if not sys.stdin.isatty():
        raise UsageError(f"no password for {key}: ${PASSWORD_VARIABLE} is not set and there "
                         "is no terminal to ask on",
                         hint=f"export {PASSWORD_VARIABLE}=... (cosign reads it too)")
    try:
        password = getpass.getpass("Enter password for private key: ")
        if new and getpass.getpass("Enter password for private key again: ") != password:
            raise UsageError("the two passwords differ", hint="type the same password twice")
    except EOFError:
        raise UsageError(f"no password for {key}", hint=f"set {PASSWORD_VARIABLE}") from None
    return password.encode()
