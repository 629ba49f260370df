"""``stockade image build`` and ``stockade image push``: reproducible images made with
mmdebstrap into the local OCI layout ($STOCKADE_HOME/layout), and uploaded from there."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.image.layout import Layout

ACTIONS = ("build", "push")
PUSH_S = 3600.0


def add_actions(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``build`` and ``push`` actions."""
    build = sub.add_parser(
        "build", help="build a minimal Debian image with mmdebstrap (reproducible)",
        description="Build NAME from the Debian SUITE: its Essential packages plus --include, "
        "with SOURCE_DATE_EPOCH set (same inputs, same digest), into the local OCI layout "
        "($STOCKADE_HOME/layout, readable by skopeo and umoci). Prints NAME@sha256:DIGEST as "
        "its last line.")
    build.add_argument("name", metavar="NAME", help="a repository path, e.g. team/base")
    build.add_argument("--suite", required=True, help="e.g. bookworm")
    build.add_argument("--include", default="", metavar="PKG,...",
                       help="more packages (comma-separated), e.g. python3,ca-certificates")
    build.add_argument("--mirror", default="", metavar="URL|LINE",
                       help="a mirror URL or a whole sources.list line (default: "
                       "mmdebstrap's, deb.debian.org)")
    build.add_argument("--variant", default="essential",
                       help="mmdebstrap's variant (default essential, the smallest)")
    build.add_argument("--source-date-epoch", type=int, metavar="SECONDS",
                       help="every timestamp of the image (default $SOURCE_DATE_EPOCH, else 0)")
    push = sub.add_parser(
        "push", help="push a built image to a registry",
        description="Upload NAME@sha256:DIGEST from the local OCI layout to REGISTRY/REPO "
        "(and tag it when the target has :TAG). Prints REGISTRY/REPO@sha256:DIGEST.")
    push.add_argument("image", metavar="NAME@sha256:DIGEST")
    push.add_argument("target", metavar="REGISTRY/REPO[:TAG]")


def main(args: argparse.Namespace) -> int:
    """Run ``build`` or ``push``."""
    from stockade.config import ensure_home, load_settings
    from stockade.image.layout import Layout

    settings = load_settings()
    ensure_home(settings)
    layout = Layout(settings.home / "layout")
    if args.action == "build":
        return _build(args, layout, settings.home / "tmp" / f"build-{os.getpid()}")
    return _push(args, layout, settings)


def _build(args: argparse.Namespace, layout: Layout, work: Path) -> int:
    from stockade.errors import UsageError
    from stockade.image.build import BuildRequest, build
    from stockade.text import digits

    epoch = args.source_date_epoch
    if epoch is None:
        text = os.environ.get("SOURCE_DATE_EPOCH", "0")
        if not digits(text):
            raise UsageError(f"SOURCE_DATE_EPOCH {text[:40]!r} is not a number of seconds",
                             hint="unset it or set it to e.g. $(date +%s)")
        epoch = int(text)
    include = tuple(p.strip() for p in args.include.split(",") if p.strip())
    request = BuildRequest(args.name, args.suite, include, args.mirror, args.variant, epoch)
    print(f"building {args.name} from {args.suite} ({args.variant}"
          + (f" + {len(include)} package(s)" if include else "") + ") with mmdebstrap ...",
          flush=True)
    digest = build(request, layout, work)
    print(f"{args.name}@{digest}")
    return 0


def _push(args: argparse.Namespace, layout: Layout, settings: Settings) -> int:
    from stockade.errors import UsageError
    from stockade.image.publish import push
    from stockade.image.reference import parse_reference
    from stockade.image.registry import Registry
    from stockade.image.settings import registry_config

    name, at, digest = args.image.partition("@")
    if not at or not digest.startswith("sha256:"):
        raise UsageError(f"{args.image[:200]!r} is not NAME@sha256:DIGEST",
                         hint="use the last line stockade image build printed")
    text = args.target
    last = text.rsplit("/", 1)[-1]
    target = parse_reference(text if ":" in last or "@" in text else f"{text}@{digest}")
    registry = Registry(registry_config(settings)).within(PUSH_S)
    try:
        pushed = push(layout, name, digest, registry, target)
    finally:
        registry.close()
    print(f"{target.registry}/{target.repository}@{pushed}")
    return 0
