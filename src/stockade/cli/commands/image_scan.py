"""``stockade image sbom|scan``: an image's CycloneDX SBOM (stored, and attached to the image
in its registry), and its vulnerabilities against OSV data (``image/sbom.py``,
``image/scan.py``).

``scan`` exits 0 when no finding is at or above ``--fail-on`` (default: the runner's
``image_refuse_severity``), 1 when one is, or when the image's package database cannot be
read (a job on the image would be refused), 2 for bad input (a reference, the data, a
severity) and 4 when the registry cannot be reached for an image not cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.image.cache import CachedImage, ImageCache
    from stockade.image.vulns import ScanReport

ACTIONS = ("sbom", "scan")
SEVERITIES = ("critical", "high", "medium", "low", "any", "none")


def add_actions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The subcommands of this module."""
    sbom = sub.add_parser("sbom", help="an image's CycloneDX SBOM (JSON)")
    sbom.add_argument("reference", metavar="REFERENCE",
                      help="sha256:DIGEST of a cached image, or REGISTRY/REPO@DIGEST|:TAG "
                           "(pulled if not cached)")
    sbom.add_argument("--output", metavar="FILE", help="write it to FILE, not stdout")
    sbom.add_argument("--attach", action="store_true",
                      help="push it to the image's repository at tag sha256-<hex>.sbom")
    scan = sub.add_parser("scan", help="an image's vulnerabilities, from OSV data")
    scan.add_argument("reference", metavar="REFERENCE",
                      help="sha256:DIGEST of a cached image, or REGISTRY/REPO@DIGEST|:TAG")
    scan.add_argument("--vulns", metavar="PATH",
                      help="OSV data: a JSON file, a directory of records or a zip of them "
                           "(default: vulnerability_data)")
    scan.add_argument("--json", action="store_true", help="one JSON object on stdout")
    scan.add_argument("--fail-on", choices=SEVERITIES, metavar="SEVERITY",
                      help=f"exit 1 if a finding is at or above it ({', '.join(SEVERITIES)}; "
                           "default: image_refuse_severity)")


def main(args: argparse.Namespace) -> int:
    """Run the action."""
    from stockade.cli.context import image_cache

    settings, cache = image_cache()
    image = cached_image(settings, cache, args.reference)
    return _sbom(args, settings, cache, image) if args.action == "sbom" \
        else _scan(args, settings, cache, image)


def cached_image(settings: Settings, cache: ImageCache, text: str) -> CachedImage:
    """The image ``text`` names: cached (a bare digest, or a pinned reference of the same
    repository), else resolved and pulled into the cache."""
    from stockade.cli.commands.image import PULL_S
    from stockade.errors import UsageError
    from stockade.image.reference import parse_reference
    from stockade.image.registry import Registry
    from stockade.image.settings import registry_config

    if text.startswith("sha256:"):
        found = cache.get(text) if _is_digest(text) else None
        if found is None:
            raise UsageError(f"no cached image {text[:80]!r}",
                             hint="list them with: stockade image list (or name "
                                  "REGISTRY/REPO@DIGEST to pull it)")
        return found
    ref = parse_reference(text)
    registry = Registry(registry_config(settings)).within(PULL_S)
    try:  # (a pinned image that is cached is not asked of the registry)
        pinned = ref if ref.digest else ref.with_digest(registry.resolve(ref))
        image, _ = cache.pull(registry, pinned)
    finally:
        registry.close()
    return image


def _sbom(args: argparse.Namespace, settings: Settings, cache: ImageCache,
          image: CachedImage) -> int:
    from stockade.image.sbom import attach, stored_sbom

    sbom = stored_sbom(cache.root, image)
    if args.output:
        Path(args.output).write_bytes(sbom)
        print(f"wrote the SBOM of {image.reference} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(sbom)
        sys.stdout.flush()
    if args.attach:
        from stockade.cli.commands.image import PULL_S
        from stockade.image.registry import Registry
        from stockade.image.settings import registry_config

        registry = Registry(registry_config(settings)).within(PULL_S)
        try:
            with tempfile.TemporaryDirectory(dir=cache.root / "tmp") as tmp:
                where = attach(registry, image, sbom, Path(tmp))
        finally:
            registry.close()
        print(f"attached: {where}", file=sys.stderr)
    return 0


def _scan(args: argparse.Namespace, settings: Settings, cache: ImageCache,
          image: CachedImage) -> int:
    from stockade.errors import UsageError
    from stockade.image.scan import report_json, scan_cached, threshold

    data = args.vulns or settings.vulnerability_data
    if not data:
        raise UsageError("no vulnerability data to scan against",
                         hint="pass --vulns PATH (an OSV JSON file, a directory of OSV records "
                              "or a zip of them) or set vulnerability_data")
    fail_on = args.fail_on or settings.image_refuse_severity
    limit = threshold(fail_on)
    report, _ = scan_cached(cache.root, image, data)
    above = report.at_least(limit) if limit is not None else 0
    if args.json:
        doc = {"image": image.reference, **report_json(report), "fail_on": fail_on,
               "above_threshold": above}
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        _print_table(image, report)
        if above:
            print(f"{above} finding(s) at or above {fail_on}")
    return 1 if above else 0


def _print_table(image: CachedImage, report: ScanReport) -> None:
    """The findings, most severe first, then the counts."""
    from stockade.image.scan import summary

    rows = [(f.severity.value, f.id, f.package, f.installed, f.fixed or "-",
             ", ".join(f.aliases[:3]) + (" ..." if len(f.aliases) > 3 else ""))
            for f in report.findings]
    header = ("SEVERITY", "ID", "PACKAGE", "INSTALLED", "FIXED", "ALIASES")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    print(image.reference)
    if rows:
        for row in [header, *rows]:
            print("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=False)) + "  "
                  + row[-1])
    else:
        print("no findings")
    print(summary(report))


def _is_digest(text: str) -> bool:
    value = text.removeprefix("sha256:")
    return len(value) == 64 and not value.strip("0123456789abcdef")
