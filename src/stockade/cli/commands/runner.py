"""``stockade runner start|enrol-token|list|drain|resume|quarantine``: runner agents."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from stockade.cli.remote import add_server_argument

if TYPE_CHECKING:
    from stockade.control.fleet import FleetService

HELP = "run a runner agent, or enrol and manage runners"
TRUST_CHOICES = ("untrusted", "trusted", "protected")
DESCRIPTION = """\
stockade runner start --server URL [--enrol-token T] [--name N] [--labels L1,L2] ...
stockade runner enrol-token [--pool P] [--ttl 10m] [--labels L] [--max-trust T]
                                                  a single-use token (shown once)
stockade runner list [--json]                        runners, their status and last contact
stockade runner drain ID                             take no new jobs (finish those running)
stockade runner resume ID                            take jobs again after drain
stockade runner quarantine ID                        stop it for good (see below)

start runs this host as a runner agent of a stockade server: it makes an Ed25519 key
($STOCKADE_HOME), enrols once with a token an admin issued, attests its hardening at every
start and every session, then claims and runs jobs until SIGTERM (it finishes those it runs).
See docs/fleet.md.

The other actions are an admin's. Without --server (or $STOCKADE_SERVER) they work on this
host's state directory (the one `stockade server` serves); with it, on the server, with an
admin token in $STOCKADE_TOKEN. Quarantine ends the runner's sessions, fails its running jobs
(runner_lost) and revokes their secrets; it comes back only by enrolling anew."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The actions."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    start = sub.add_parser("start", help="run this host as a runner agent of a server",
                           description="Enrol (the first time) or attest, then claim and run "
                           "jobs from the server until SIGTERM or SIGINT.")
    from stockade.runner.agent import add_start_arguments

    add_start_arguments(start)
    token = sub.add_parser("enrol-token", help="issue a single-use enrolment token")
    token.add_argument("--pool", default="default", help="the pool its runner joins "
                       "(default: default)")
    token.add_argument("--ttl", default="10m", metavar="DURATION",
                       help="how long it may be used, at most 7 days (default 10m)")
    token.add_argument("--labels", default="", metavar="L1,L2",
                       help="the labels its runner may offer (all of them unless it asks for "
                       "fewer with runner start --labels; it also gets pool:POOL)")
    token.add_argument("--max-trust", default="trusted", choices=TRUST_CHOICES,
                       help="the highest trust of the jobs its runner may take (default "
                       "trusted: protected jobs need runners enrolled for them)")
    listing = sub.add_parser("list", help="the enrolled runners")
    listing.add_argument("--json", action="store_true", help="one JSON array on stdout")
    for action, text in (("drain", "take no new jobs"), ("resume", "take jobs again"),
                         ("quarantine", "stop a runner for good, failing its jobs")):
        one = sub.add_parser(action, help=text)
        one.add_argument("id", metavar="ID", help="the runner's id (stockade runner list)")
    for name, parser in sub.choices.items():
        if name != "start":
            add_server_argument(parser)


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    if args.action == "start":
        from stockade.runner.agent import start

        return start(args)
    from stockade.cli.remote import connect

    remote = connect(args)
    if args.action == "enrol-token":
        ttl = _ttl(args.ttl)
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        if remote is not None:
            made = remote.json("POST", "/api/v1/enrol-tokens", "admin",
                               {"pool": args.pool, "ttl_s": ttl, "labels": list(labels),
                                "max_trust": args.max_trust})
            token, token_id, expires = made["token"], made["id"], made["expires_at"]
        else:
            fleet, actor = _local()
            row, token = fleet.create_enrol_token(args.pool, ttl, actor, labels,
                                                  args.max_trust)
            token_id, expires = row.id, row.expires_at
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
        sys.stderr.write(f"enrolment token {_e(token_id)} for pool {_e(args.pool)}, single "
                         f"use, until {when}; it is shown once:\n")
        print(token)
        return 0
    if args.action == "list":
        rows = remote.json("GET", "/api/v1/runners", "admin") if remote is not None \
            else _local_runners()
        print_runners(rows, args.json)
        return 0
    if remote is not None:
        out = remote.json("POST", f"/api/v1/runners/{_runner_id(args.id)}/{args.action}",
                          "admin", missing=f"no runner {_e(args.id[:64])!r} on the server")
        status, failed = out["status"], out.get("failed_jobs") or []
    else:
        status, failed = _local_action(args.action, _runner_id(args.id))
    print(f"runner {args.id} {status}" + (f"; its jobs failed (runner_lost): "
                                          f"{', '.join(map(_e, failed))}" if failed else ""))
    return 0


def _ttl(text: str) -> float:
    from stockade.errors import UsageError
    from stockade.spec.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise UsageError(f"--ttl: {e}", hint="e.g. --ttl 10m, 1h or 24h") from e


def _runner_id(text: str) -> str:
    from stockade.errors import UsageError

    if not (0 < len(text) <= 64 and text.isascii()
            and all(c.isalnum() or c in "_.-" for c in text)):
        raise UsageError(f"{_e(text[:64])!r} is not a runner id",
                         hint="list them with: stockade runner list")
    return text


def _local() -> tuple[FleetService, str]:
    from stockade.cli.context import fleet_service, open_control

    settings, control = open_control()
    return fleet_service(settings, control), control.actor


def _local_runners() -> list[dict[str, Any]]:
    from stockade.api.admin import runner_view

    fleet, _ = _local()
    return [runner_view(r) for r in fleet.store.runners()]


def _local_action(action: str, runner_id: str) -> tuple[str, list[str]]:
    from stockade.errors import UsageError

    fleet, actor = _local()
    if fleet.store.get_runner(runner_id) is None:
        raise UsageError(f"no runner {runner_id!r}", hint="list them with: stockade runner list")
    failed: list[str] = []
    if action == "quarantine":
        lost = fleet.quarantine(runner_id, actor)
        done, failed = lost is not None, lost or []
    else:
        done = fleet.drain(runner_id, actor) if action == "drain" \
            else fleet.resume(runner_id, actor)
    now = fleet.store.get_runner(runner_id)
    status = now.status if now is not None else "gone"
    if not done:
        raise UsageError(f"runner {runner_id} is {status}: it cannot {action}")
    return status, failed


def print_runners(rows: list[dict[str, Any]], as_json: bool) -> None:
    """The runners as one JSON array, or a table."""
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    if not rows:
        print("no runners yet; issue a token with: stockade runner enrol-token, then on the "
              "runner host: stockade runner start --server URL --enrol-token TOKEN")
        return
    print(f"{'RUNNER':<34} {'POOL':<12} {'STATUS':<12} {'LABELS':<20} LAST SEEN")
    for r in rows:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_seen_at"])) \
            if r.get("last_seen_at") else "-"
        print(f"{_e(r['runner_id']):<34} {_e(r['pool']):<12} {_e(r['status']):<12} "
              f"{_e(','.join(r['labels']) or '-'):<20} {seen}")


def _e(value: object) -> str:
    from stockade.text import escape_controls

    return escape_controls(str(value))
