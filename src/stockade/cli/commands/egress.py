"""``stockade egress baseline JOB...``: a minimal allowlist from what jobs actually reached."""

from __future__ import annotations

import argparse
import sys

HELP = "egress tools (baseline an allowlist from audit-mode runs)"
DESCRIPTION = """\
stockade egress baseline JOB [JOB...]
  Turn the egress decisions of one or more finished jobs (run with egress.mode: audit) into
  the smallest allowlist that lets them do the same in block mode, printed as a YAML
  egress block to paste into the job spec. Destinations that are always refused (loopback,
  private, link-local ...) are not included; they are listed on stderr."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``baseline JOB...``."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    base = sub.add_parser("baseline", help="print a minimal allowlist for the given jobs")
    base.add_argument("jobs", metavar="JOB", nargs="+", help="job ids or unique prefixes")


def main(args: argparse.Namespace) -> int:
    """Print the allowlist."""
    from stockade.cli.context import open_control, require_job
    from stockade.control.egress import egress_baseline

    _, control = open_control()
    events = []
    for ref in args.jobs:
        job_id = require_job(control, ref).job.id  # an id: letters and digits only
        trail = control.audit_trail(job_id)
        if not any(e.action.startswith("egress.") for e in trail):
            sys.stderr.write(f"stockade: note: job {job_id} recorded no egress; run it with "
                             "egress: {mode: audit} to record what it reaches\n")
        events += trail
    allow, refused = egress_baseline(events)
    lines = ["egress:", "  mode: block", "  allow:" if allow else "  allow: []"]
    lines += [f"    - {entry!r}" if entry.startswith("[") else f"    - {entry}"
              for entry in allow]
    sys.stdout.write("\n".join(lines) + "\n")
    for entry in refused:
        sys.stderr.write(f"stockade: not included (refused by policy): {entry}\n")
    return 0
