"""``stockade secret set|list|rm|rotate``: the encrypted secret store."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.cli.remote import add_server_argument

if TYPE_CHECKING:
    from stockade.cli.remote import Remote
    from stockade.secrets.broker import Scope

HELP = "manage secrets (values never on the command line)"
DESCRIPTION = """\
stockade secret set NAME [--from-file F] [--refs GLOB] [--trust LEVEL] [--jobs GLOB]
                         [--labels L1,L2]
stockade secret rotate NAME [--from-file F] [--refs GLOB]
stockade secret list
stockade secret rm NAME

Values are read from standard input (or --from-file), never from the command line, and stored
encrypted (AES-256-GCM) under the master key ($STOCKADE_HOME/master.key, created 0600 on first
use, or STOCKADE_MASTER_KEY_FILE). A trailing newline on standard input is dropped. Values
shorter than 4 characters are refused: they could not be masked in logs.

Scope: a job receives a secret only if its ref (stockade run --ref) matches --refs (a glob,
e.g. refs/heads/main or 'refs/tags/*'; default '*'), its trust (stockade run --trust) is at
least --trust (trusted by default; protected for release jobs), its name matches --jobs (a
glob, default '*') and it has every label in --labels. Jobs of trust untrusted never receive
secrets. The ref and the trust are decided by whoever submits the job; the name and the labels
are written in the job spec, so bind a sensitive secret on --refs and --trust, not only on
--jobs and --labels. rotate keeps the scope unless --refs is given.

With --server (or $STOCKADE_SERVER) the secrets are a server's (an admin token in
$STOCKADE_TOKEN): the value travels to the server over TLS and no endpoint ever returns it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The four actions."""
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    put = sub.add_parser("set", help="store a secret (value on stdin)",
                         description="Store a secret. For an existing secret, the scope options "
                         "not given keep their values (a new value never widens a scope).")
    put.add_argument("name", metavar="NAME")
    put.add_argument("--from-file", type=Path, metavar="F", help="read the value from F")
    put.add_argument("--jobs", metavar="GLOB", help="job names (new secret: '*')")
    put.add_argument("--labels", metavar="L1,L2", help="labels the job must have (new: none)")
    put.add_argument("--trust", choices=("trusted", "protected"),
                     help="the least trust a job needs (new secret: trusted)")
    put.add_argument("--refs", metavar="GLOB",
                     help="refs the job must run, e.g. refs/heads/main (new secret: '*')")
    rot = sub.add_parser("rotate", help="a new value for a secret, same scope (value on stdin)")
    rot.add_argument("name", metavar="NAME")
    rot.add_argument("--from-file", type=Path, metavar="F", help="read the value from F")
    rot.add_argument("--refs", default=None, metavar="GLOB",
                     help="also change the refs the job must run (default: unchanged)")
    sub.add_parser("list", help="names, scopes and versions (never values)")
    rm = sub.add_parser("rm", help="delete a secret")
    rm.add_argument("name", metavar="NAME")
    for action in sub.choices.values():
        add_server_argument(action)


MAX_VALUE_BYTES = 64 * 1024


def read_value(path: Path | None) -> bytes:
    """The value from a file or standard input (a prompt without echo on a terminal)."""
    from stockade.errors import UsageError

    if path is not None:
        import os
        import stat

        try:  # never blocks (a FIFO) and never reads more than a secret may hold (/dev/zero)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"{path} is not a regular file",
                                 hint="give a file, or pipe the value on standard input")
            data = os.read(fd, MAX_VALUE_BYTES + 1)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from e
        finally:
            os.close(fd)
        if len(data) > MAX_VALUE_BYTES:
            raise UsageError(f"{path} is larger than a secret may be (64 KiB)",
                             hint="store a smaller value, or a key that unlocks the data")
        return data
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("value: ").encode()
    data = sys.stdin.buffer.read(MAX_VALUE_BYTES + 2)
    return data[:-1] if data.endswith(b"\n") else data


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    from stockade.cli.remote import connect

    remote = connect(args)
    if remote is not None:
        return _remote(remote, args)
    from stockade.cli.context import open_control
    from stockade.secrets.broker import Scope

    _, control = open_control()
    broker = control.broker
    assert broker is not None
    if args.action == "set":
        before = {s.name: s.scope for s in broker.secrets()}.get(args.name)
        base = before or Scope("*", (), "trusted", "*")  # unset options keep what is there
        labels = base.labels if args.labels is None else _labels(args.labels)
        scope = Scope(args.jobs or base.jobs, labels, args.trust or base.trust,
                      args.refs or base.refs)
        version = broker.set(args.name, read_value(args.from_file), scope)
        _stored(args.name, version, before, scope)
    elif args.action == "rotate":
        version = broker.rotate(args.name, read_value(args.from_file), refs=args.refs)
        print(f"secret {args.name} rotated (version {version})")
    elif args.action == "rm":
        broker.remove(args.name)
        print(f"secret {args.name} removed")
    else:
        print_secrets([{"name": s.name, "version": s.version, "key_id": s.key_id,
                        "updated_at": s.updated_at, "scope": s.scope._asdict()}
                       for s in broker.secrets()])
    return 0


def _remote(remote: Remote, args: argparse.Namespace) -> int:
    """The same actions on a server's secret store (an admin token)."""
    import base64
    import re

    from stockade.secrets.broker import Scope, check_value

    if args.action != "list" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", args.name):
        check_value(args.name, b"")  # the local refusal of such a name
    path = f"/api/v1/secrets/{args.name}" if args.action != "list" else ""
    if args.action in ("set", "rotate"):
        value = read_value(args.from_file)
        check_value(args.name, value)  # the same refusals as here, before anything is sent
        body: dict[str, Any] = {"value": base64.b64encode(value).decode(),
                                "refs": args.refs, "rotate": args.action == "rotate"}
        if args.action == "set":
            body.update(jobs=args.jobs, trust=args.trust,
                        labels=None if args.labels is None else list(_labels(args.labels)))
        out = remote.json("PUT", path, "admin", {k: v for k, v in body.items()
                                                 if v is not None})
        if args.action == "rotate":
            print(f"secret {args.name} rotated (version {out['version']})")
            return 0
        before = Scope(**out["previous_scope"]) if out.get("previous_scope") else None
        _stored(args.name, out["version"], before and before._replace(
            labels=tuple(before.labels)), Scope(**{**out["scope"],
                                                    "labels": tuple(out["scope"]["labels"])}))
    elif args.action == "rm":
        remote.json("DELETE", path, "admin", missing=f"there is no secret named {args.name}")
        print(f"secret {args.name} removed")
    else:
        print_secrets(remote.json("GET", "/api/v1/secrets", "admin"))
    return 0


def _labels(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def _stored(name: str, version: int, before: Scope | None, scope: Scope) -> None:
    print(f"secret {name} stored (version {version})")
    if before is not None and before != scope:  # set replaces the scope: say so loudly
        sys.stderr.write(f"stockade: warning: the scope of {name} changed from "
                         f"{_scope_text(before)} to {_scope_text(scope)}; to change only "
                         f"the value, use: stockade secret rotate {name}\n")


def print_secrets(rows: list[dict[str, Any]]) -> None:
    """Names, versions, scopes and keys (never values), one line each."""
    from stockade.text import escape_controls as _e

    if not rows:
        print("no secrets yet; add one with: stockade secret set NAME < value-file")
    for s in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["updated_at"]))
        scope = s["scope"]
        shown = ",".join(scope["labels"]) or "-"
        print(_e(f"{s['name']:<24} v{s['version']:<3} refs={scope['refs']:<16} "
                 f"trust={scope['trust']:<9} jobs={scope['jobs']:<16} labels={shown:<12} "
                 f"key={s['key_id']} updated {when}"))


def _scope_text(scope: Scope) -> str:
    labels = ",".join(scope.labels) or "-"
    return f"refs={scope.refs} trust={scope.trust} jobs={scope.jobs} labels={labels}"
