"""``stockade doctor``: can this host run jobs with the full hardening baseline?"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.sandbox.interface import Finding

PULL_S = 600.0

HELP = "check this host's hardening support"
DESCRIPTION = """\
Check every control of the hardening baseline for this runner's sandbox backend
(sandbox_backend: bwrap, oci or runsc; user namespaces, the unprivileged per-job uids, seccomp,
cgroup limits) and run a probe job that verifies them from inside a sandbox; then say for each
backend whether it is usable on this host, and if not why, with the fix. With --image REF,
the probe also runs on that image (pulled into the cache if needed): every control holds on
it too. Exits 0 if the whole baseline is active for the selected backend, 4 if not, with a
remedy for each problem."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--json] [--image REF]``."""
    p.add_argument("--json", action="store_true", help="the findings as JSON on stdout")
    p.add_argument("--image", metavar="REGISTRY/REPO@sha256:DIGEST|:TAG",
                   help="run the probe on this image too (the runner's registry settings)")


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
    if args.image:
        findings = [*findings, _image_probe(settings, args.image)]
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


def _image_probe(settings: Settings, text: str) -> Finding:
    """The probe on the image ``text``, pulled (or found) in the runner's cache and held in
    use while it runs; a pull that fails is a failed finding with the reason."""
    import os

    from stockade.errors import StockadeError
    from stockade.image.cache import ImageCache
    from stockade.image.reference import parse_reference
    from stockade.image.registry import Registry
    from stockade.image.settings import registry_config
    from stockade.sandbox import get_backend
    from stockade.sandbox.checks import finding, probe_image

    ref = parse_reference(text)  # (a malformed reference is a usage error: exit 2)
    cache = ImageCache(settings.home / "images", settings.image_cache_bytes)
    registry = Registry(registry_config(settings)).within(PULL_S)
    try:
        pinned = ref.with_digest(registry.resolve(ref)) if not ref.digest else ref
        image, _ = cache.pull(registry, pinned)
        held = cache.use(image.digest)
        if held is None:
            raise StockadeError(f"{image.reference} was evicted from the cache meanwhile",
                                hint="run stockade doctor again (and image prune later)")
    except StockadeError as e:
        return finding(f"end-to-end probe on {text}", False, f"cannot pull it: {e.message}",
                       e.hint or "check the reference and the registry settings")
    finally:
        registry.close()
    try:
        return probe_image(get_backend(settings.sandbox_backend, settings), image.rootfs,
                           image.reference)
    finally:
        os.close(held)


def _escape(text: str) -> str:
    """``text`` shown as it is (a runtime's error may hold brackets rich would read)."""
    from rich.markup import escape

    return escape(text)
