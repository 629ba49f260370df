"""``stockade oidc jwks|discovery|rotate``: the job-identity issuer."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "job identity tokens: JWKS, discovery document, key rotation"
DESCRIPTION = """\
A job whose spec says `id_token: {aud: AUDIENCE}` finds a signed OIDC ID token (ES256, valid
5 minutes, refreshed by the runner while the job runs) in the file $STOCKADE_ID_TOKEN_FILE.

stockade oidc jwks        the public keys (serve them at <issuer>/.well-known/jwks.json)
stockade oidc discovery   the /.well-known/openid-configuration document
stockade oidc rotate      sign with a new key from now on; the old key stays in the JWKS
                          until the tokens it signed have expired

The issuer is the oidc_issuer setting (STOCKADE_OIDC_ISSUER). The audiences a job may ask for
depend on its trust (stockade run --trust): oidc_audiences_untrusted (default: none, so
untrusted jobs get no token), oidc_audiences_trusted and oidc_audiences_protected (default '*',
any), set as comma-separated lists in STOCKADE_OIDC_AUDIENCES_UNTRUSTED, _TRUSTED, _PROTECTED.
A job asking for another audience is denied (exit 3).

Relying parties should bind on sub = trust:<trust>:ref:<ref> (or on the trust and ref claims),
which the submitter decides; job_name comes from the spec and proves nothing."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The three actions."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("jwks", help="print the JSON Web Key Set")
    sub.add_parser("discovery", help="print the OpenID configuration document")
    sub.add_parser("rotate", help="start signing with a new key")


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    from stockade.cli.context import open_control

    _, control = open_control()
    ring = control.keyring
    if args.action == "jwks":
        sys.stdout.write(json.dumps(ring.jwks(), indent=2) + "\n")
    elif args.action == "discovery":
        sys.stdout.write(json.dumps(ring.discovery(), indent=2) + "\n")
    else:
        kid = ring.rotate()
        control.store.record([control.audit_event("oidc.key_rotated", None, kid=kid)])
        print(f"signing with key {kid}; the previous key stays published until its tokens "
              "expire")
    return 0
