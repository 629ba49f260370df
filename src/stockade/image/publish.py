"""``stockade image push``: an image of the local OCI layout, uploaded to a registry.

Blobs first (the layer and the config; each skipped when the registry has it), the manifest
last, under its digest and, when the target names one, a tag: a registry never holds a
manifest whose blobs are missing. The manifest's bytes are pushed as built, so the digest in
the registry is the one ``build`` printed.
"""

from __future__ import annotations

from typing import Any

from stockade.errors import UsageError
from stockade.image.layout import Layout
from stockade.image.reference import ImageRef
from stockade.image.registry import Registry


def push(layout: Layout, name: str, digest: str, registry: Registry, target: ImageRef) -> str:
    """Push ``name@digest`` from ``layout`` to ``target`` (a repository, maybe with a tag);
    the pushed manifest's digest."""
    if target.digest and target.digest != digest:
        raise UsageError(f"the target names digest {target.digest}, the image is {digest}",
                         hint="name the target by repository (and tag) only")
    entry = layout.find(name, digest)
    for descriptor in _blobs(entry.manifest):
        blob = str(descriptor["digest"])
        registry.push_blob(target, layout.blob_path(blob), blob)
    media_type = str(entry.manifest.get("mediaType"))
    pushed = registry.push_manifest(target, digest, media_type, entry.raw)
    if target.tag:
        registry.push_manifest(target, target.tag, media_type, entry.raw)
    return pushed


def _blobs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    layers = manifest.get("layers")
    config = manifest.get("config")
    if not isinstance(layers, list) or not isinstance(config, dict):
        raise UsageError("the built manifest has no config or layers",
                         hint="build the image again")
    return [config, *layers]
