"""``stockade doctor``: can this host run jobs with the full hardening baseline?"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "check this host's hardening support"
DESCRIPTION = """\
Check every control of the hardening baseline (bubblewrap, user namespaces, the unprivileged
per-job uids, seccomp, cgroup limits) and run a probe job that verifies them from inside a
sandbox. Exits 0 if the whole baseline is active, 4 if not, with a remedy for each problem."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--json]``."""
    p.add_argument("--json", action="store_true", help="the findings as JSON on stdout")


def main(args: argparse.Namespace) -> int:
    """Print the findings."""
    from stockade.config import ensure_home, load_settings
    from stockade.sandbox import get_backend

    settings = load_settings()
    ensure_home(settings)
    findings = get_backend("bwrap", settings).check()
    ok = all(f.ok for f in findings if f.required)
    if args.json:
        sys.stdout.write(json.dumps({"ok": ok, "findings": [f._asdict() for f in findings]}) + "\n")
        return 0 if ok else 4
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for f in findings:
        mark = "[green]ok  [/]" if f.ok else ("[red]FAIL[/]" if f.required else "[yellow]warn[/]")
        console.print(f"{mark} {f.control}: {f.detail}")
        if f.remedy:
            console.print(f"     fix: {f.remedy}")
    console.print("[green]the full hardening baseline is active[/]" if ok else
                  "[red bold]this host cannot run jobs with the full hardening baseline; "
                  "stockade will refuse to run them[/]")
    return 0 if ok else 4
