"""``stockade audit verify|list``: the append-only, hash-chained audit trail."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "verify or list the audit trail"
DESCRIPTION = """\
stockade audit verify          check the hash chain of every audit event (exit 1 if broken)
stockade audit list [--job J]  the events, oldest first (--json: one JSON object per line)

Values a job chose (names, paths, destinations) are printed with control characters spelled
out (\\n, \\x1b, \\u202e, ...), so that they cannot pass for another event or act on the
terminal.

Every event's hash covers the previous event's hash: an edited, deleted or reordered event
breaks the chain from that point on."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``verify`` and ``list``."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("verify", help="check the hash chain")
    listing = sub.add_parser("list", help="print the events")
    listing.add_argument("--job", metavar="JOB", help="only the events of this job")
    listing.add_argument("--json", action="store_true", help="JSON lines on stdout")


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    from stockade.audit import verify_chain
    from stockade.cli.context import open_control, require_job

    _, control = open_control()
    if args.action == "verify":
        records = control.store.audit_records()
        broken = verify_chain(records)
        if broken is None:
            head = records[-1][2] if records else "none"
            # the chain cannot show a cut-off tail by itself: keep these two somewhere else
            print(f"audit trail intact: {len(records)} events, last hash {head}")
            return 0
        event = records[broken][0]
        sys.stderr.write(f"stockade: audit trail BROKEN at event {broken + 1} of {len(records)} "
                         f"({_e(event.action)} for job {_e(event.job_id)}): it or an earlier "
                         "event was altered or removed\n")
        return 1
    job_id = require_job(control, args.job).job.id if args.job else None
    for event, _, digest in control.store.audit_records(job_id):
        if args.json:  # ensure_ascii: every control and bidi character becomes a \u escape
            sys.stdout.write(json.dumps({"at": event.at, "actor": event.actor,
                                         "action": event.action, "job_id": event.job_id,
                                         "detail": event.detail, "hash": digest}) + "\n")
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
            detail = " ".join(f"{_e(k)}={_e(v)}" for k, v in sorted(event.detail.items()))
            print(f"{when} {_e(event.action):<22} {_e(event.job_id or '-'):<19} "
                  f"{_e(event.actor):<24} {detail}")
    return 0


def _e(value: object) -> str:
    """A stored value, printable: control characters spelled out (a job chose many of them)."""
    from stockade.text import escape_controls

    return escape_controls(str(value))
