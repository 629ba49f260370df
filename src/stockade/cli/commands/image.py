"""``stockade image pull|list|inspect|prune``: the runner's cache of unpacked images."""

from __future__ import annotations

import argparse
import importlib
import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.image.cache import CachedImage, ImageCache

HELP = "job images: pull, list, inspect, prune, build, push, sign, verify, sbom, scan"
PULL_S = 3600.0  # one pull, all of it
# actions kept in modules of their own: each has add_actions(sub) and main(args), and
# ACTIONS, the names it adds
MORE: tuple[str, ...] = ("stockade.cli.commands.image_build", "stockade.cli.commands.image_sign",
                         "stockade.cli.commands.image_scan")
DESCRIPTION = """\
stockade image pull REGISTRY/REPO@sha256:DIGEST | REGISTRY/REPO:TAG
stockade image list [--json]
stockade image inspect DIGEST|REFERENCE [--json]
stockade image prune [--all]
stockade image build NAME --suite SUITE [--include PKG,...] | push NAME@sha256:DIGEST REGISTRY/REPO
stockade image sign REF --key cosign.key | verify REF [--key cosign.pub] | generate-key-pair
stockade image sbom REF [--attach] [--output FILE]
stockade image scan REF [--vulns PATH] [--json] [--fail-on SEVERITY]

The runner pulls the images jobs name by digest from the registry (or its mirrors, in the
order of registry_mirrors), checks every digest (manifest, config, each layer and its
uncompressed DiffID), and unpacks them into its cache in $STOCKADE_HOME/images (root's, 0700),
one tree per chain of layers, shared read-only by the jobs that use it. A digest already
cached is used without asking the registry. pull prints REGISTRY/REPO@sha256:DIGEST as its last
line (a tag is resolved once, here). prune evicts the least recently used images until the
cache fits image_cache_bytes (--all: every image no job is pulling). Credentials come from
registry_auth_file, plain HTTP only for insecure_registries (see the settings table in
README).

sbom prints an image's CycloneDX SBOM (its dpkg packages; --attach pushes it to the image's
repository at tag sha256-<hex>.sbom); scan matches those packages against OSV data (--vulns or
vulnerability_data) and exits 1 if a finding is at or above --fail-on (default:
image_refuse_severity, at which the runner refuses jobs on the image: image_vulnerable)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommands."""
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pull = sub.add_parser("pull", help="pull an image into the cache")
    pull.add_argument("reference", metavar="REFERENCE")
    listing = sub.add_parser("list", help="the cached images, most recently used first")
    listing.add_argument("--json", action="store_true")
    inspect = sub.add_parser("inspect", help="one cached image")
    inspect.add_argument("image", metavar="DIGEST|REFERENCE",
                         help="sha256:DIGEST, REGISTRY/REPO@sha256:DIGEST, or "
                              "REGISTRY/REPO:TAG (the registry is asked for the tag's "
                              "digest)")
    inspect.add_argument("--json", action="store_true", help="one line of JSON (default: "
                                                              "indented)")
    prune = sub.add_parser("prune", help="evict images to fit the cache limit")
    prune.add_argument("--all", action="store_true",
                       help="evict every image no running job uses")
    for name in MORE:
        importlib.import_module(name).add_actions(sub)


def main(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    for name in MORE:
        module = importlib.import_module(name)
        if args.action in module.ACTIONS:
            return int(module.main(args))
    from stockade.cli.context import image_cache

    settings, cache = image_cache()
    if args.action == "pull":
        from stockade.image.reference import parse_reference
        from stockade.image.registry import Registry
        from stockade.image.settings import registry_config

        ref = parse_reference(args.reference)
        registry = Registry(registry_config(settings)).within(PULL_S)
        try:
            pinned = ref.with_digest(registry.resolve(ref)) if not ref.digest else ref
            image, pulled = cache.pull(registry, pinned)
        finally:
            registry.close()
        print(f"{'pulled' if pulled else 'cached'}: {image.size // 1024} KiB, chain "
              f"{image.chain_id}")
        print(image.reference)
        return 0
    if args.action == "list":
        images = cache.images()
        if args.json:
            print(json.dumps([_doc(i) for i in images]))
            return 0
        for i in images:
            print(f"{i.reference}  {i.size // 1024} KiB  used "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(i.last_used))}")
        if not images:
            print("no images cached (pull one with: stockade image pull REFERENCE)")
        return 0
    if args.action == "inspect":
        image = _find(cache, _pinned(settings, args.image))
        print(json.dumps(_doc(image), indent=None if args.json else 2))
        return 0
    evicted = cache.prune(everything=args.all)
    for image in evicted:
        print(f"evicted {image.reference}")
    left = len(cache.images())
    kept = f"; {left} kept (in use by a running job, or within the cache limit)" if left else ""
    print(f"{len(evicted)} image(s) evicted{kept}")
    return 0


def _pinned(settings: Settings, text: str) -> str:
    """``text``, a tagged reference resolved to its digest by the registry as at admission
    (the cache keeps digests only), or as it is."""
    if "@" in text or text.startswith("sha256:"):
        return text
    from stockade.cli.context import resolve_image
    from stockade.errors import StockadeError

    try:
        return resolve_image(settings, text)
    except StockadeError as e:
        also = "name the image by its digest (stockade image list shows them)"
        e.hint = f"{e.hint}; or {also}" if e.hint else also[0].upper() + also[1:]
        raise


def _find(cache: ImageCache, text: str) -> CachedImage:
    from stockade.errors import UsageError

    digest = text.rpartition("@")[2] if "@" in text else text
    well_formed = digest.startswith("sha256:") and len(digest) == 71 and all(
        c in "0123456789abcdef" for c in digest[7:])
    found = cache.get(digest) if well_formed else None
    if found is None:
        raise UsageError(f"no cached image {text[:200]!r}",
                         hint="pull it with: stockade image pull REFERENCE (stockade image "
                              "list shows the cached ones)")
    return found


def _doc(image: CachedImage) -> dict[str, object]:
    return {"reference": image.reference, "digest": image.digest, "chain_id": image.chain_id,
            "size": image.size, "last_used": image.last_used, "config": image.config}
