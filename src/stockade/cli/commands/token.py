"""``stockade token create|list|revoke``: API tokens of ``stockade server``."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "create, list or revoke API tokens of stockade server"
DESCRIPTION = """\
stockade token create NAME --role viewer|submitter|admin [--max-trust T] [--ttl DURATION]
                           [--refs GLOB]
stockade token list
stockade token revoke ID

A token is printed once, at creation (stk_<id>_<secret>); only a hash of it is kept. Roles
include the ones before them: viewer reads jobs, submitter also submits, admin also
administers. Jobs submitted with a token never get more trust than its --max-trust (default
untrusted: a token for fork pull requests cannot submit trusted work)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``create``, ``list``, ``revoke``."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    create = sub.add_parser("create", help="make a token (printed once)")
    create.add_argument("name", metavar="NAME", help="what the token is for")
    create.add_argument("--role", required=True, choices=("viewer", "submitter", "admin"),
                        help="viewer reads jobs, submitter also submits, admin also "
                        "administers")
    create.add_argument("--max-trust", default="untrusted",
                        choices=("untrusted", "trusted", "protected"),
                        help="the highest trust of jobs it submits (default untrusted)")
    create.add_argument("--ttl", metavar="DURATION",
                        help="expire after, e.g. 720h or 90m (default: never)")
    create.add_argument("--refs", default="*", metavar="GLOB",
                        help="the refs its jobs may say they run, e.g. 'refs/pull/*' "
                        "(default '*')")
    sub.add_parser("list", help="the tokens (never their secrets)")
    revoke = sub.add_parser("revoke", help="revoke a token at once")
    revoke.add_argument("id", metavar="ID")


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    from stockade.api import auth
    from stockade.audit import AuditEvent
    from stockade.cli.context import open_control
    from stockade.errors import UsageError
    from stockade.text import escape_controls as _e

    _, control = open_control()
    store, now = control.store, time.time()
    if args.action == "create":
        ttl = None
        if args.ttl:
            from stockade.spec.units import parse_duration

            try:
                ttl = parse_duration(args.ttl)
            except ValueError as e:
                raise UsageError(f"--ttl: {e}", hint="e.g. --ttl 720h, 12h or 10m") from e
        row, token = auth.new_token(args.name, args.role, args.max_trust, ttl, now, args.refs)
        store.insert_token(row, AuditEvent(control.actor, "token.created", now, None,
                                           {"token": row.id, "role": row.role,
                                            "max_trust": row.max_trust}))
        sys.stderr.write(f"token {row.id} ({row.role}, jobs at most {row.max_trust}); it is "
                         "shown once:\n")
        print(token)
    elif args.action == "list":
        rows = store.tokens()
        if not rows:
            print("no tokens yet; make one with: stockade token create NAME --role viewer")
        for t in rows:
            state = ("revoked" if t.revoked_at is not None else "expired"
                     if t.expires_at is not None and t.expires_at <= now else "active")
            print(f"{t.id:<10} {t.role:<10} max-trust={t.max_trust:<10} refs={_e(t.refs):<16} "
                  f"{state:<8} {_e(t.name)}")
    elif not store.revoke_token(args.id[:64], now, AuditEvent(
            control.actor, "token.revoked", now, None, {"token": args.id[:64]})):
        raise UsageError(f"no active token {_e(args.id[:64])!r}",
                         hint="list them with: stockade token list")
    else:
        print(f"token {args.id} revoked")
    return 0
