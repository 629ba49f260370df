"""``stockade jobs``: the newest jobs."""

from __future__ import annotations

import argparse
import json
import sys
import time

from stockade.cli.argtypes import count

HELP = "list recent jobs"
DESCRIPTION = "List the newest jobs with their status, failure reason and duration."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--limit N] [--json]``."""
    p.add_argument("--limit", type=count, default=20, metavar="N",
                   help="how many jobs, 1 to 100000 (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")


def main(args: argparse.Namespace) -> int:
    """Print the table."""
    from stockade.cli.context import open_control

    _, control = open_control()
    rows = control.jobs(args.limit)
    if args.json:
        sys.stdout.write(json.dumps([
            {"job_id": j.id, "name": j.name, "status": j.status,
             "failure_reason": j.failure_reason, "created_at": j.created_at,
             "duration_s": round(j.finished_at - j.started_at, 3)
             if j.started_at is not None and j.finished_at is not None else None}
            for j in rows]) + "\n")
        return 0
    if not rows:
        print("no jobs yet; run one with: stockade run job.yaml")
        return 0
    print(f"{'JOB':<19} {'NAME':<24} {'STATUS':<10} {'REASON':<18} {'CREATED':<19} DURATION")
    for j in rows:
        took = f"{j.finished_at - j.started_at:.1f}s" if j.finished_at and j.started_at else "-"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at))
        print(f"{j.id:<19} {j.name:<24} {j.status:<10} {j.failure_reason or '-':<18} "
              f"{created:<19} {took}")
    return 0
