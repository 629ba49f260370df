"""Entry point: argument parsing, settings, and the one handler mapping errors to exit codes.

Exit codes (stable): 0 job succeeded; 1 job failed; 2 invalid spec or usage; 3 denied by policy;
4 infrastructure error (the sandbox could not start, the state directory is unusable).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from typing import NoReturn

from stockade import __version__
from stockade.errors import StockadeError

COMMANDS = {
    "run": "stockade.cli.commands.run",
    "validate": "stockade.cli.commands.validate",
    "jobs": "stockade.cli.commands.jobs",
    "show": "stockade.cli.commands.show",
    "logs": "stockade.cli.commands.logs",
    "doctor": "stockade.cli.commands.doctor",
    "egress": "stockade.cli.commands.egress",
    "secret": "stockade.cli.commands.secret",
    "oidc": "stockade.cli.commands.oidc",
    "audit": "stockade.cli.commands.audit",
    "token": "stockade.cli.commands.token",
    "server": "stockade.cli.commands.server",
    "submit": "stockade.cli.commands.submit",
    "cancel": "stockade.cli.commands.cancel",
    "runner": "stockade.cli.commands.runner",
    "up": "stockade.cli.commands.up",
    "provenance": "stockade.cli.commands.provenance",
    "verify": "stockade.cli.commands.verify",
    "image": "stockade.cli.commands.image",
}

DESCRIPTION = """\
stockade runs CI jobs in hardened, ephemeral sandboxes and records what they did.

State lives in $STOCKADE_HOME (default ~/.local/share/stockade, mode 0700). With --server URL
or $STOCKADE_SERVER, submit, jobs, show, logs, cancel, audit list, secret and runner talk to a
stockade server instead, with the API token in $STOCKADE_TOKEN (see stockade up).
Exit codes: 0 succeeded, 1 job failed, 2 invalid spec or usage, 3 denied by policy,
4 infrastructure error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"stockade: error: {message}\nhint: {self.prog} --help\n")
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command-line grammar; each command module adds its own arguments. With ``only``,
    just that command's arguments are built (the rest of the grammar costs a run ~20 ms)."""
    parser = _Parser(prog="stockade", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(handler=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        return int(args.handler(args))
    except StockadeError as e:
        sys.stderr.write(f"stockade: {e.diagnostics()}\n")
        return e.exit_code
    except BrokenPipeError:
        return 0
    except OSError as e:  # a host problem no module translated: still no traceback
        where = f" ({e.filename})" if e.filename else ""
        sys.stderr.write(f"stockade: {e.strerror or e}{where}\n")
        return 4
    except KeyboardInterrupt:
        sys.stderr.write("stockade: interrupted\n")
        return 130


def entry() -> NoReturn:
    """The ``stockade`` console script: :func:`main`, then the database closed, the output
    flushed and the process ended without finalising the interpreter, which would add ~20 ms
    to every command (tearing down some 300 modules). Only a command that ended normally (exit
    0 to 3) takes this path: after an infrastructure error or an interrupt something may be
    left open, and a thread other than a daemon may still be at work; then the process exits
    the usual way."""
    code = main()
    context = sys.modules.get("stockade.cli.context")
    if context is not None:
        context.close_control()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (BrokenPipeError, ValueError):  # a closed pipe or stream: nothing to flush
            pass
    if code not in (0, 1, 2, 3) or any(
            t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
