"""``stockade show JOB``: one job's result, steps, artifacts and audit trail."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

HELP = "show one job"
DESCRIPTION = """\
Show a job's result (the same object as run --json), its steps, artifacts, egress and audit
trail. Anything the job chose (names, paths, destinations, error text) is printed with its
control characters spelled out (\\n, \\x1b, \\u202e, ...), so it cannot pass for another line
or act on the terminal; --json escapes them the JSON way."""


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
    if args.json:  # ensure_ascii: every control and bidi character becomes a \\u escape
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    lines = [*_summary(result), "audit:"]
    lines += [f"  {time.strftime('%H:%M:%S', time.localtime(e.at))} {_e(e.action):<22} "
              f"by {_e(e.actor)}{_details(e.detail)}"
              for e in control.audit_trail(view.job.id)]
    sys.stdout.write("\n".join(line for line in lines if line) + "\n")
    return 0


def _e(value: object) -> str:
    """A stored value, printable: control characters spelled out."""
    from stockade.text import escape_controls

    return escape_controls(str(value))


def _details(detail: Mapping[str, Any]) -> str:
    return "".join(f"  {_e(k)}={_value(k, v)}" for k, v in sorted(detail.items())
                   if v is not None)


def _value(key: str, value: object) -> str:
    """A detail as a person reads it: times as times, booleans as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and (key == "at" or key.endswith("_at")) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return _e(value)


def _summary(result: dict[str, Any]) -> list[str]:
    out = [f"job       {_e(result['job_id'])}  ({_e(result['name'])})",
           f"status    {_e(result['status'])}"
           + (f"  reason: {_e(result['failure_reason'])}" if result["failure_reason"] else ""),
           f"attempt   {result['attempt']}",
           f"duration  {result['duration_s']}s" if result["duration_s"] is not None else ""]
    for key in ("message", "error", "failed_at", "timeout"):
        if result.get(key):
            out.append(f"{key.replace('_', ' '):<9} {_e(result[key])}")
    out.append("steps:")
    out += [f"  {_e(s['name']):<24} {_e(s['status']):<10} "
            + (f"exit={s['exit_code']} " if s["exit_code"] is not None else "")
            + f"{s['duration_s']}s" for s in result["steps"]] or ["  (none ran)"]
    if result["artifacts"]:
        out.append("artifacts:")
        out += [f"  {_e(a['path'])}  {a['size']} bytes  sha256:{_e(a['sha256'])}"
                for a in result["artifacts"]]
    for problem in result.get("artifacts_refused") or ():
        out.append(f"  refused: {_e(problem)}")
    egress = result.get("egress") or {}
    for kind in ("allowed", "denied", "audit_would_deny"):
        if egress.get(kind):
            out.append(f"egress {kind.replace('_', ' ')}: "
                       + ", ".join(_e(d) for d in egress[kind]))
    if egress.get("truncated"):
        out.append(f"egress: {_e(egress['truncated'])} more destinations not listed")
    return out
