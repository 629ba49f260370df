"""``stockade verify ARTIFACT --provenance FILE``: check an artifact against its provenance."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

HELP = "check an artifact against its signed provenance"
DESCRIPTION = """\
stockade verify ARTIFACT --provenance FILE [--key PUBLIC.pem]

Checks that FILE (what stockade provenance JOB printed) is a DSSE envelope signed by the
control plane's key, that it holds SLSA v1 provenance, and that one of its subjects has the
sha256 of ARTIFACT. The key is this host's control plane's unless --key names a PEM public key
(what stockade provenance --public-key printed; Ed25519 or ECDSA P-256). Prints the subject,
the builder and the invocation (job/attempt) and exits 0; exits 1 when anything does not
verify, saying what."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``ARTIFACT --provenance FILE [--key PEM]``."""
    p.add_argument("artifact", metavar="ARTIFACT", help="the artifact file to check")
    p.add_argument("--provenance", metavar="FILE", required=True,
                   help="the DSSE envelope from stockade provenance")
    p.add_argument("--key", metavar="PEM", help="the public key that signed it (default: "
                   "this host's control plane's)")


def main(args: argparse.Namespace) -> int:
    """Verify, and say what was found."""
    import sys

    from stockade.provenance.dsse import MAX_ENVELOPE_BYTES, EnvelopeError, NotSignedBy
    from stockade.provenance.issue import check
    from stockade.provenance.keys import load_public_key, signing_key
    from stockade.text import escape_controls

    artifact = _read_digest(Path(args.artifact))
    raw = _read(Path(args.provenance), MAX_ENVELOPE_BYTES + 1, "--provenance")
    if args.key:
        public = load_public_key(_read(Path(args.key), 64 * 1024, "--key"), args.key)
    else:
        from stockade.cli.context import open_control

        _, control = open_control()
        public = signing_key(control.store).private.public_key()
    try:
        found = check(raw, public, artifact)
    except EnvelopeError as e:
        whose = "" if args.key or not isinstance(e, NotSignedBy) else (
            " (the key is this host's control plane's; pass --key with the public key of the "
            "one that made it)")
        sys.stderr.write(f"stockade verify: {args.artifact}: NOT verified: {e}{whose}\n")
        return 1
    print(f"verified: {escape_controls(found.subject)} sha256:{artifact}\n"
          f"  builder {escape_controls(found.builder)}\n"
          f"  invocation {escape_controls(found.invocation)}")
    return 0


def _read(path: Path, limit: int, what: str) -> bytes:
    from stockade.errors import UsageError

    try:
        with path.open("rb") as f:
            return f.read(limit)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}",
                         hint="pass a readable file") from None


def _read_digest(path: Path) -> str:
    from stockade.errors import UsageError

    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}",
                         hint="pass the artifact file to check") from None
    return digest.hexdigest()
