"""``stockade audit verify|list|anchor``: the append-only, hash-chained audit trail."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stockade.cli.remote import add_server_argument

HELP = "verify or list the audit trail"
DESCRIPTION = """\
stockade audit verify          check the hash chain and its head (exit 1 if broken)
stockade audit list [--job J]  the events, oldest first (--json: one JSON array); with
                               --server (or $STOCKADE_SERVER) a server's (an admin token)
stockade audit anchor          write a missing audit.head from the database's head

A new database starts a new trail; the head of the one before is kept as
audit.head.before-<time>, and verify fails until that file is taken away (keep it with the
moved database). After restoring a backup of the database, restore audit.head from the same
backup.

Values a job chose (names, paths, destinations) are printed with control characters spelled
out (\\n, \\x1b, \\u202e, ...), so that they cannot pass for another event or act on the
terminal.

Every event's hash covers the previous event's hash: an edited, deleted or reordered event
breaks the chain from that point on. The head of the chain (event count and last hash) is kept
in the database with every event and copied to $STOCKADE_HOME/audit.head after each commit, so
removing the newest events, or putting back an older copy of the database, is detected too.
Someone who can rewrite both the database and audit.head can still forge a shorter trail: to
detect that as well, keep the line verify prints (count and last hash) somewhere else."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``verify`` and ``list``."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("verify", help="check the hash chain and its head")
    sub.add_parser("anchor", help="write a missing audit.head from the database's head")
    listing = sub.add_parser("list", help="print the events")
    listing.add_argument("--job", metavar="JOB", help="only the events of this job")
    listing.add_argument("--json", action="store_true", help="one JSON array on stdout")
    add_server_argument(listing)


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    from stockade.cli.remote import connect

    if args.action == "verify":
        return _verify()
    if args.action == "anchor":
        return _anchor()
    remote = connect(args)
    if remote is not None:
        job_id = remote.job_id(args.job) if args.job else None
        print_records(remote.json("GET", "/api/v1/audit", "admin",
                                  params={"job": job_id} if job_id else None), args.json)
        return 0
    from stockade.cli.context import open_control, require_job

    _, control = open_control()
    job_id = require_job(control, args.job).job.id if args.job else None
    print_records([{"at": event.at, "actor": event.actor, "action": event.action,
                    "job_id": event.job_id, "detail": event.detail, "hash": digest}
                   for event, _, digest in control.store.audit_records(job_id)], args.json)
    return 0


def print_records(records: list[dict[str, Any]], as_json: bool) -> None:
    """The records as one JSON array (as jobs --json), or one line each."""
    if as_json:  # ensure_ascii: controls become \u escapes
        sys.stdout.write(json.dumps(records) + "\n")
        return
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        detail = " ".join(f"{_e(k)}={_e(v)}" for k, v in sorted(r["detail"].items()))
        print(f"{when} {_e(r['action']):<22} {_e(r['job_id'] or '-'):<19} "
              f"{_e(r['actor']):<24} {detail}")


def _verify() -> int:
    """Check the chain, then its head against the database's record and the file's copy."""
    from stockade.audit import GENESIS, check_head, verify_chain
    from stockade.audit.head import HeadFile
    from stockade.config import ensure_home, load_settings
    from stockade.store.open import open_store
    from stockade.store.sqlite import SqliteStore

    settings = load_settings()
    ensure_home(settings)
    store = open_store(settings)
    snap = store.audit_snapshot()
    records = snap.records
    problems = []
    broken = verify_chain(records)
    if broken is not None:
        event = records[broken][0]
        problems.append(f" at event {broken + 1} of {len(records)} ({_e(event.action)} for job "
                        f"{_e(event.job_id)}): it or an earlier event was altered or removed")
    hashes = [digest for _, _, digest in records]
    if not isinstance(store, SqliteStore):  # PostgreSQL: its head row is the anchor
        problems += [f": {p}" for p in check_head(hashes, snap.db_head, snap.db_head, "", "")]
    else:
        problems += [f": {p}" for p in check_head(hashes, snap.db_head, snap.file_head,
                                                   snap.file_problem,
                                                   str(store.audit_head.path))]
    retired = store.audit_head.retired() if isinstance(store, SqliteStore) else []
    for path in retired:  # a deleted or moved-away database
        try:
            earlier = HeadFile(path).read()
            said = f"ended at {earlier.events} events, last hash {earlier.hash}" if earlier \
                else "left an empty head"
        except ValueError:
            said = "left a file that is not a head"
        problems.append(f": this database started afresh after an earlier trail that {said} "
                        f"({path}); if the database was moved away on purpose, keep that file "
                        "with it and remove it here")
    if not problems:
        head = records[-1][2] if records else GENESIS
        print(f"audit trail intact: {len(records)} events, last hash {head}")
        return 0
    sys.stderr.write("".join(f"stockade: audit trail BROKEN{p}\n" for p in problems))
    if snap.file_head is None and not snap.file_problem and broken is None:
        sys.stderr.write("hint: if audit.head was lost, stockade audit anchor writes it again "
                         "from the database's trail (it never overwrites one)\n")
    return 1


def _anchor() -> int:
    """Write audit.head from the database's head, if it is missing (never overwriting one)
    and the trail in the database verifies."""
    from stockade.audit import verify_chain
    from stockade.audit.head import head_of
    from stockade.config import ensure_home, load_settings
    from stockade.store.sqlite import SqliteStore

    settings = load_settings()
    ensure_home(settings)
    if settings.database_url:
        sys.stderr.write("stockade: on PostgreSQL the database's head row is the anchor; "
                         "there is no audit.head file to write\nhint: stockade audit verify "
                         "checks the trail against it\n")
        return 2
    store = SqliteStore(settings.db_path)
    snap = store.audit_snapshot()
    if snap.file_head is not None or snap.file_problem:
        sys.stderr.write(f"stockade: {store.audit_head.path} exists; it is never overwritten "
                         "(it may be the evidence of a removed tail)\nhint: stockade audit "
                         "verify says whether it matches\n")
        return 2
    hashes = [digest for _, _, digest in snap.records]
    if snap.db_head is None or verify_chain(snap.records) is not None \
            or head_of(hashes) != snap.db_head:
        sys.stderr.write("stockade: the trail in the database does not verify; no head is "
                         "written for it\nhint: stockade audit verify\n")
        return 1
    store.audit_head.create(snap.db_head)
    print(f"audit head written: {snap.db_head.events} events, last hash {snap.db_head.hash}")
    return 0


def _e(value: object) -> str:
    """A stored value, printable: control characters spelled out (a job chose many of them)."""
    from stockade.text import escape_controls

    return escape_controls(str(value))
