"""``stockade show JOB``: one job's result, steps, artifacts and audit trail."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stockade.cli.remote import add_server_argument

if TYPE_CHECKING:
    from stockade.cli.remote import Remote

HELP = "show one job"
DESCRIPTION = """\
Show a job's result (the same object as run --json), its steps, artifacts, egress and audit
trail. Anything the job chose (names, paths, destinations, error text) is printed with its
control characters spelled out (\\n, \\x1b, \\u202e, ...), so it cannot pass for another line
or act on the terminal; --json escapes them the JSON way.

With --server (or $STOCKADE_SERVER) the job is a server's (a viewer token in $STOCKADE_TOKEN;
the audit trail is shown to admin tokens only)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB [--json] [--server URL]``."""
    p.add_argument("job", metavar="JOB", help="job id or a unique prefix of it")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    add_server_argument(p)


def main(args: argparse.Namespace) -> int:
    """Print the job."""
    from stockade.cli.remote import connect

    remote = connect(args)
    if remote is not None:
        return _remote(remote, args)
    from stockade.cli.context import open_control, require_job

    _, control = open_control()
    view = require_job(control, args.job)
    result = view.result()
    if args.json:
        print_result(result)
        return 0
    print_job(result, [(e.at, e.action, e.actor, e.detail)
                       for e in control.audit_trail(view.job.id)])
    return 0


def _remote(remote: Remote, args: argparse.Namespace) -> int:
    """The same, from a server (the audit trail only for an admin's token)."""
    from stockade.cli.remote import Refused

    job_id = remote.job_id(args.job)
    result = remote.json("GET", f"/api/v1/jobs/{job_id}", "viewer")
    if args.json:
        print_result(result)
        return 0
    try:
        records = remote.json("GET", "/api/v1/audit", "admin", params={"job": job_id})
    except Refused as e:
        if e.status != 403:
            raise
        print_job(result, None)
        return 0
    print_job(result, [(r["at"], r["action"], r["actor"], r["detail"]) for r in records])
    return 0


def print_result(result: dict[str, Any]) -> None:
    """The result as JSON (ensure_ascii: every control and bidi character a \\u escape)."""
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def print_job(result: dict[str, Any],
              events: list[tuple[float, str, str, Mapping[str, Any]]] | None) -> None:
    """The summary and the audit trail (``(at, action, actor, detail)``; None: not shown)."""
    lines = [*_summary(result), "audit:"]
    if events is None:
        lines.append("  (the audit trail is shown to admin tokens only)")
    lines += [f"  {time.strftime('%H:%M:%S', time.localtime(at))} {_e(action):<22} "
              f"by {_e(actor)}{_details(detail)}" for at, action, actor, detail in events or ()]
    sys.stdout.write("\n".join(line for line in lines if line) + "\n")


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
