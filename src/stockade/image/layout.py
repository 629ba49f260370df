"""An OCI image layout on disk (image-layout spec v1): the images ``stockade image build``
made, found by name and digest, and pushed from there.

``oci-layout``, ``index.json`` (one entry per built image, named by the
``org.opencontainers.image.ref.name`` annotation) and ``blobs/sha256/<hex>``. Blobs are
written to a temporary name, flushed to disk and renamed into place; the index is replaced
atomically under a lock, so concurrent builds never lose each other's entries. The layout is
readable by any OCI tool (``skopeo copy oci:DIR:NAME``, ``umoci unpack --image DIR:NAME``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from stockade.errors import UsageError

REF_NAME = "org.opencontainers.image.ref.name"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MAX_INDEX_BYTES = 16 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class Blob(NamedTuple):
    """A blob of the layout: its descriptor's parts and where it is."""

    digest: str
    size: int
    path: Path


class Entry(NamedTuple):
    """An image of the layout: its name, the manifest's digest and bytes."""

    name: str
    digest: str
    manifest: dict[str, Any]
    raw: bytes


def canonical(doc: Any) -> bytes:
    """The one serialisation of ``doc`` we write (sorted keys, no spaces): same document,
    same bytes, same digest."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    """The OCI layout at ``root`` (created on first write, root-only)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` is (or would be)."""
        if not _DIGEST.fullmatch(digest):
            raise UsageError(f"{digest[:80]!r} is not a sha256 digest",
                             hint="write it as sha256:<64 hex digits>")
        return self.root / "blobs" / "sha256" / digest[7:]

    def _ensure(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        (self.root / "blobs" / "sha256").mkdir(mode=0o700, parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            _write_atomic(marker, b'{"imageLayoutVersion":"1.0.0"}')

    def add_bytes(self, data: bytes) -> Blob:
        """Store ``data`` as a blob; its descriptor."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._ensure()
        path = self.blob_path(digest)
        if not path.exists():
            _write_atomic(path, data)
        return Blob(digest, len(data), path)

    def add_file(self, src: Path, digest: str) -> Blob:
        """Move the file ``src`` (whose sha256 the caller computed) in as a blob."""
        self._ensure()
        path = self.blob_path(digest)
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.replace(src, path)
        _fsync_dir(path.parent)
        return Blob(digest, path.stat().st_size, path)

    def tag(self, name: str, manifest: Blob) -> None:
        """Name the manifest ``manifest`` ``name`` in the index (alongside other images of
        that name: each build stays findable by its digest)."""
        self._ensure()
        with self._locked():
            index = self._index()
            entry = {"mediaType": OCI_MANIFEST, "digest": manifest.digest,
                     "size": manifest.size, "annotations": {REF_NAME: name}}
            manifests = [m for m in index["manifests"] if m != entry]
            index["manifests"] = [*manifests, entry]
            _write_atomic(self.root / "index.json", canonical(index))

    def find(self, name: str, digest: str) -> Entry:
        """The image ``name`` whose manifest is ``digest``; UsageError if there is none."""
        for m in self._index()["manifests"]:
            annotations = m.get("annotations") if isinstance(m, dict) else None
            if isinstance(annotations, dict) and annotations.get(REF_NAME) == name \
                    and m.get("digest") == digest:
                raw = self.read(digest, MAX_INDEX_BYTES)
                return Entry(name, digest, json.loads(raw), raw)
        raise UsageError(f"no image {name}@{digest} was built here ({self.root})",
                         hint="build it with: stockade image build NAME --suite SUITE")

    def read(self, digest: str, limit: int) -> bytes:
        """The blob ``digest`` (at most ``limit`` bytes), checked against its digest."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            data = None
        if data is None or len(data) > limit \
                or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise _damaged(self.root, digest, data is None)
        return data

    def check(self, digest: str, size: int) -> Path:
        """The path of blob ``digest``, after checking that its bytes are ``size`` bytes
        with that sha256 (UsageError if it is missing or damaged: nothing of it is sent)."""
        path = self.blob_path(digest)
        sha, got = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
                    got += len(chunk)
        except FileNotFoundError:
            raise _damaged(self.root, digest, True) from None
        if got != size or "sha256:" + sha.hexdigest() != digest:
            raise _damaged(self.root, digest, False)
        return path

    def _index(self) -> dict[str, Any]:
        try:
            with open(self.root / "index.json", "rb") as f:
                doc = json.loads(f.read(MAX_INDEX_BYTES))
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        except (ValueError, RecursionError):  # (damaged: not JSON, or nested too deeply)
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise UsageError(f"{self.root / 'index.json'} is not an OCI index",
                             hint=f"remove {self.root} and build again")
        return doc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _damaged(root: Path, digest: str, missing: bool) -> UsageError:
    return UsageError(f"blob {digest} of {root} is {'missing' if missing else 'damaged'}",
                      hint="build the image again")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
