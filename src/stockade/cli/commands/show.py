"""``stockade show JOB``: one job's result, steps, artifacts and audit trail."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "show one job"
DESCRIPTION = "Show a job's result (the same object as run --json), its steps and artifacts."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB [--json]``."""
    p.add_argument("job", metavar="JOB", help="job id or a unique prefix of it")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")


def main(args: argparse.Namespace) -> int:
    """Print the job."""
    from stockade.cli.context import open_control, require_job

    _, control = open_control()
    view = require_job(control, args.job)
    result = view.result()
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    out = [f"job       {result['job_id']}  ({result['name']})",
           f"status    {result['status']}"
           + (f"  reason: {result['failure_reason']}" if result["failure_reason"] else ""),
           f"attempt   {result['attempt']}",
           f"duration  {result['duration_s']}s" if result["duration_s"] is not None else "",
           "steps:"]
    out += [f"  {s['name']:<24} {s['status']:<10} exit={s['exit_code']} {s['duration_s']}s"
            for s in result["steps"]] or ["  (none ran)"]
    if result["artifacts"]:
        out.append("artifacts:")
        out += [f"  {a['path']}  {a['size']} bytes  sha256:{a['sha256']}"
                for a in result["artifacts"]]
    out.append("audit:")
    out += [f"  {time.strftime('%H:%M:%S', time.localtime(e.at))} {e.action:<15} by {e.actor}"
            for e in control.audit_trail(view.job.id)]
    sys.stdout.write("\n".join(line for line in out if line) + "\n")
    return 0
