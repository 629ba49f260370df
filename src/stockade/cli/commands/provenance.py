"""``stockade provenance JOB``: the signed SLSA v1 provenance of a job's artifacts."""

from __future__ import annotations

import argparse
import json
import sys

from stockade.cli.remote import add_server_argument

HELP = "print a job's signed SLSA provenance"
DESCRIPTION = """\
stockade provenance JOB [--server URL]
stockade provenance --public-key [--server URL]

Prints the SLSA v1 provenance of a finished job's artifacts: an in-toto Statement v1 (subjects:
the artifacts with the sha256 the control plane checked; resolved dependencies: the job's spec
by digest and its image; the builder: this control plane, named by its oidc_issuer; the
invocation: job and attempt) in a DSSE envelope signed with the control plane's Ed25519 key,
which lives in its database and is never reachable from a job. The same job always gives the
same envelope. Check an artifact against it with: stockade verify ARTIFACT --provenance FILE.

--public-key prints that key (PEM), for verifiers elsewhere. With --server (or
$STOCKADE_SERVER) the job and the key are the server's (a viewer token in $STOCKADE_TOKEN).
A job without artifacts, or not finished, has no provenance (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB | --public-key`` and ``--server``."""
    p.add_argument("job", metavar="JOB", nargs="?", help="job id or a unique prefix of it")
    p.add_argument("--public-key", action="store_true",
                   help="print the public key that signs provenance (PEM)")
    add_server_argument(p)


def main(args: argparse.Namespace) -> int:
    """Print the envelope (or the public key)."""
    from stockade.cli.remote import connect
    from stockade.errors import UsageError

    if bool(args.job) == bool(args.public_key):
        raise UsageError("name a JOB, or pass --public-key",
                         hint="e.g. stockade provenance j0123abcd > release.intoto.json")
    remote = connect(args)
    if remote is not None:
        if args.public_key:
            key = remote.json("GET", "/api/v1/provenance/public-key", "viewer")
            sys.stdout.write(str(key["public_key"]))
            return 0
        job_id = remote.job_id(args.job)
        print(json.dumps(remote.json("GET", f"/api/v1/jobs/{job_id}/provenance", "viewer",
                                     missing=f"job {job_id} has no provenance")))
        return 0
    from stockade.cli.context import open_control, require_job
    from stockade.provenance.issue import ProvenanceUnavailable, issue
    from stockade.provenance.keys import signing_key

    settings, control = open_control()
    key = signing_key(control.store)
    if args.public_key:
        sys.stdout.write(key.public_pem())
        return 0
    view = require_job(control, args.job)
    try:
        print(json.dumps(issue(view.job, view.artifacts, key, settings.oidc_issuer)))
    except ProvenanceUnavailable as e:
        raise UsageError(str(e), hint="provenance covers a finished job's artifacts") from None
    return 0
