"""A CycloneDX 1.6 SBOM (JSON) of a cached image, stored with the cache and attached to the
image in its registry.

The SBOM lists the image's dpkg packages (see ``packages.py``) as ``library`` components with
package URLs ``pkg:deb/<distribution>/NAME@VERSION?arch=ARCH&distro=debian-12&upstream=SOURCE``
(``SOURCE@VERSION`` when the source version differs, as for a binNMU), its distribution as
an ``operating-system`` component, and the image itself (repository and manifest digest) as
the ``container`` the SBOM describes. It is deterministic: its serial number is derived from
the image's digest and it has no timestamp, so the same image gives the same bytes.

Stored as ``<cache>/sbom/<digest hex>.cdx.json`` (root's, 0600, written atomically; those of
evicted images are removed when another is stored). Attached as cosign's ``attach sbom`` does:
a manifest at tag ``sha256-<digest hex>.sbom`` in the image's repository whose single layer
is the SBOM (``application/vnd.cyclonedx+json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.image.packages import ImageContents, UnreadablePackages, read_contents
from stockade.image.reference import parse_reference

if TYPE_CHECKING:
    from cyclonedx.model.component import Component

    from stockade.image.cache import CachedImage
    from stockade.image.registry import Registry

MEDIA_TYPE = "application/vnd.cyclonedx+json"
# the library's time grows with the square of the components (~11 s for 3,000 here, ~2 min
# for this many): an image listing more is refused
MAX_SBOM_PACKAGES = 10_000
_SERIAL_NAMESPACE = uuid.UUID("0b6c1bd4-58c7-4a5a-9d0e-5e5f1a3f7c21")  # stockade's SBOMs


def sbom_tag(digest: str) -> str:
    """The tag an image's SBOM is attached at (cosign's convention)."""
    return f"sha256-{digest_hex(digest)}.sbom"


def make_sbom(image: CachedImage, contents: ImageContents) -> bytes:
    """The SBOM document of ``image`` holding ``contents`` (see the module docstring;
    UnreadablePackages over :data:`MAX_SBOM_PACKAGES`)."""
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.dependency import Dependency
    from cyclonedx.output.json import JsonV1Dot6

    if len(contents.packages) > MAX_SBOM_PACKAGES:
        raise UnreadablePackages(f"the image lists {len(contents.packages)} packages; an SBOM "
                                 f"is made of at most {MAX_SBOM_PACKAGES}")
    root = _container(image)
    bom = Bom(serial_number=uuid.uuid5(_SERIAL_NAMESPACE, image.digest))
    bom.metadata.component = root
    bom.metadata.tools.components.add(Component(type=ComponentType.APPLICATION,
                                                name="stockade", version=_version()))
    components = _components(contents)
    bom.components.update(components)
    # (the root depends on every package: dpkg's own dependencies are not read; built here
    # rather than by register_dependency, which takes quadratic time)
    bom.dependencies.update([Dependency(ref=root.bom_ref, dependencies=[
        Dependency(ref=c.bom_ref) for c in components]),
        *(Dependency(ref=c.bom_ref) for c in components)])
    doc = json.loads(JsonV1Dot6(bom).output_as_string())
    doc.get("metadata", {}).pop("timestamp", None)  # (the same image, the same bytes)
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def _container(image: CachedImage) -> Component:
    """The component the SBOM describes: the image, by repository and manifest digest."""
    from cyclonedx.model.bom_ref import BomRef
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    ref = parse_reference(image.reference)
    purl = PackageURL("oci", name=ref.repository.rsplit("/", 1)[-1], version=image.digest,
                      qualifiers={"repository_url": f"{ref.registry}/{ref.repository}"})
    return Component(type=ComponentType.CONTAINER, name=f"{ref.registry}/{ref.repository}",
                     version=image.digest, purl=purl, bom_ref=BomRef(str(purl)))


def _components(contents: ImageContents) -> list[Component]:
    """The distribution (if known) and one library per package, with its package URL."""
    from cyclonedx.model.bom_ref import BomRef
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    dist = contents.distribution
    distro = f"{dist.id}-{dist.version_id}" if dist.id and dist.version_id else ""
    components = []
    if dist.id:
        components.append(Component(type=ComponentType.OPERATING_SYSTEM, name=dist.id,
                                    version=dist.version_id or None,
                                    description=dist.pretty_name or None,
                                    bom_ref=BomRef(f"os:{dist.id}@{dist.version_id}")))
    for p in contents.packages:
        upstream = p.source if p.source_version == p.version else \
            f"{p.source}@{p.source_version}"
        qualifiers = {"arch": p.architecture, **({"distro": distro} if distro else {}),
                      **({"upstream": upstream} if upstream != p.name else {})}
        purl = PackageURL("deb", dist.id or "debian", p.name, p.version, qualifiers)
        components.append(Component(type=ComponentType.LIBRARY, name=p.name, version=p.version,
                                    purl=purl, bom_ref=BomRef(str(purl))))
    return components


def stored_sbom(cache_root: Path, image: CachedImage) -> bytes:
    """The SBOM of cached ``image``: the stored one, else made from its tree and stored."""
    path = cache_root / "sbom" / f"{digest_hex(image.digest)}.cdx.json"
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    sbom = make_sbom(image, read_contents(image.rootfs))
    store(cache_root, "sbom", path.name, sbom)
    return sbom


def attach(registry: Registry, image: CachedImage, sbom: bytes, workdir: Path) -> str:
    """Push ``sbom`` to ``image``'s repository at :func:`sbom_tag` (``workdir`` holds the
    blobs meanwhile); the reference pushed."""
    from stockade.image.registry import OCI_MANIFEST

    ref = parse_reference(image.reference)
    config = json.dumps({"architecture": "", "os": "", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [_digest(sbom)]}},
                        sort_keys=True).encode()
    for blob in (sbom, config):
        path = workdir / digest_hex(_digest(blob))
        path.write_bytes(blob)
        registry.push_blob(ref, path, _digest(blob))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": _digest(sbom), "size": len(sbom)}]},
        sort_keys=True).encode()
    tag = sbom_tag(image.digest)
    registry.push_manifest(ref, tag, OCI_MANIFEST, manifest)
    return f"{ref.registry}/{ref.repository}:{tag}"


def store(cache_root: Path, kind: str, name: str, data: bytes,
          keep: Callable[[str], bool] | None = None) -> None:
    """Write ``<cache_root>/<kind>/<name>`` atomically (0600), and remove the other files
    there that ``keep`` refuses (by default: those of images the cache no longer records)."""
    if keep is None:
        def keep(other: str) -> bool:
            return (cache_root / "images" / f"{other.split('.', 1)[0]}.json").exists()

    directory = cache_root / kind
    directory.mkdir(mode=0o700, exist_ok=True)
    tmp = directory / f".{name}.{os.getpid()}.{threading.get_native_id()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, directory / name)
    for old in directory.iterdir():
        if old.name[0] != "." and old.name != name and not keep(old.name):
            old.unlink(missing_ok=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stockade")
    except PackageNotFoundError:
        return "unknown"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """The hex of a sha256 digest (ValueError if it is not one): a safe file name."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError("not a sha256 digest")
    return value
