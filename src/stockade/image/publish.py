"""``stockade image push``: an image of the local OCI layout, uploaded to a registry.

Every blob is checked in the layout first (its size and sha256: a missing or damaged one is
refused before anything is sent), then uploaded (the layer and the config; each skipped when
the registry has it), the manifest last, under its digest and, when the target names one, a
tag: a registry never holds a manifest whose blobs are missing. The manifest's bytes are
pushed as built, so the digest in the registry is the one ``build`` printed.
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
    # every blob checked before anything is sent: a missing or damaged one is the layout's
    # fault, said so, and no byte of it (nor the manifest) reaches the registry
    blobs = [(str(d.get("digest")), layout.check(str(d.get("digest")), _size(d)))
             for d in _blobs(entry.manifest)]
    for blob, path in blobs:
        registry.push_blob(target, path, blob)
    media_type = str(entry.manifest.get("mediaType"))
    pushed = registry.push_manifest(target, digest, media_type, entry.raw)
    if target.tag:
        registry.push_manifest(target, target.tag, media_type, entry.raw)
    return pushed


def _blobs(manifest: Any) -> list[dict[str, Any]]:
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not isinstance(config, dict) \
            or not all(isinstance(layer, dict) for layer in layers):
        raise UsageError("the built manifest has no config or layers",
                         hint="build the image again")
    return [config, *layers]


def _size(descriptor: dict[str, Any]) -> int:
    size = descriptor.get("size")
    if type(size) is not int:
        raise UsageError("the built manifest has a blob without a size",
                         hint="build the image again")
    return size
