"""``stockade doctor``: can this host run jobs with the full hardening baseline?"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "check this host's hardening support"
DESCRIPTION = """\
Check every control of the hardening baseline for this runner's sandbox backend
(sandbox_backend: bwrap, oci or runsc; user namespaces, the unprivileged per-job uids, seccomp,
cgroup limits) and run a probe job that verifies them from inside a sandbox; then say for each
backend whether it is usable on this host, and if not why, with the fix. Exits 0 if the whole
baseline is active for the selected backend, 4 if not, with a remedy for each problem."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--json]``."""
    p.add_argument("--json", action="store_true", help="the findings as JSON on stdout")


def main(args: argparse.Namespace) -> int:
    """Print the findings."""
    from stockade.config import ensure_home, load_settings
    from stockade.sandbox import BACKENDS, get_backend
    from stockade.sandbox.checks import backend_summary

    settings = load_settings()
    ensure_home(settings)
    selected = settings.sandbox_backend
    by_backend = {name: get_backend(name, settings).check() for name in BACKENDS}
    findings = by_backend[selected]
    backends = [backend_summary(name, found, name == selected)
                for name, found in by_backend.items()]
    ok = all(f.ok for f in findings if f.required)
    if args.json:
        sys.stdout.write(json.dumps({"ok": ok, "backend": selected,
                                     "findings": [f._asdict() for f in findings],
                                     "backends": [f._asdict() for f in backends]}) + "\n")
        return 0 if ok else 4
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"sandbox backend {selected} (sandbox_backend):")
    for f in [*findings, *backends]:
        mark = "[green]ok  [/]" if f.ok else ("[red]FAIL[/]" if f.required else "[yellow]warn[/]")
        console.print(f"{mark} {_escape(f.control)}: {_escape(f.detail)}")
        if f.remedy:
            console.print(f"     fix: {_escape(f.remedy)}")
    console.print("[green]the full hardening baseline is active[/]" if ok else
                  "[red bold]this host cannot run jobs with the full hardening baseline; "
                  "stockade will refuse to run them[/]")
    return 0 if ok else 4


def _escape(text: str) -> str:
    """``text`` shown as it is (a runtime's error may hold brackets rich would read)."""
    from rich.markup import escape

    return escape(text)
