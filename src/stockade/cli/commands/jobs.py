"""``stockade jobs``: the newest jobs, here or on a server."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stockade.cli.argtypes import count
from stockade.cli.remote import add_server_argument

HELP = "list recent jobs"
DESCRIPTION = """\
List the newest jobs with their status, failure reason and duration: this host's, or with
--server (or $STOCKADE_SERVER) a stockade server's (a viewer token in $STOCKADE_TOKEN)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--limit N] [--json] [--server URL]``."""
    p.add_argument("--limit", type=count, default=20, metavar="N",
                   help="how many jobs, 1 to 100000 (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")
    add_server_argument(p)


def main(args: argparse.Namespace) -> int:
    """Print the table."""
    from stockade.cli.remote import connect

    remote = connect(args)
    if remote is not None:
        rows = remote.json("GET", "/api/v1/jobs", "viewer", params={"limit": args.limit})
    else:
        rows = local_rows(args.limit)
    print_jobs(rows, args.json)
    return 0


def local_rows(limit: int) -> list[dict[str, Any]]:
    """The newest jobs of this host, as ``--json`` prints them."""
    from stockade.cli.context import open_control

    _, control = open_control()
    return [{"job_id": j.id, "name": j.name, "status": j.status,
             "failure_reason": j.failure_reason, "created_at": j.created_at,
             "started_at": j.started_at, "finished_at": j.finished_at,
             "duration_s": round(j.finished_at - j.started_at, 3)
             if j.started_at is not None and j.finished_at is not None else None}
            for j in control.jobs(limit)]


_FIELDS = ("job_id", "name", "status", "failure_reason", "created_at", "duration_s")
NAME_WIDTH = 40  # the table's name column at most (a longer name is cut, "…")


def print_jobs(rows: list[dict[str, Any]], as_json: bool) -> None:
    """The JSON array, or the table (what a server sent is escaped)."""
    from stockade.text import escape_controls as _e

    if as_json:
        sys.stdout.write(json.dumps([{k: j.get(k) for k in _FIELDS} for j in rows]) + "\n")
        return
    if not rows:
        print("no jobs yet; run one with: stockade run job.yaml")
        return
    names = [_e(j["name"]) for j in rows]
    wide = min(max(len("NAME"), *(len(n) for n in names)), NAME_WIDTH)  # (the longest name)
    print(f"{'JOB':<19} {'NAME':<{wide}} {'STATUS':<10} {'REASON':<18} {'CREATED':<19} "
          "DURATION")
    for j, name in zip(rows, names, strict=True):
        started, finished = j.get("started_at"), j.get("finished_at")
        took = f"{finished - started:.1f}s" if finished and started else "-"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"]))
        name = name if len(name) <= wide else name[:wide - 1] + "…"
        print(f"{_e(j['job_id']):<19} {name:<{wide}} {_e(j['status']):<10} "
              f"{_e(j['failure_reason'] or '-'):<18} {created:<19} {took}")
