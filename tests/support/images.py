"""OCI images built by the tests (benign: files, a directory, a link), as blob files and a
manifest, and pushed with stockade's own registry client."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from stockade.image.reference import parse_reference
from stockade.image.registry import OCI_MANIFEST, Registry


class Image:
    """A one-layer OCI image built here: its blobs as files and its manifest."""

    def __init__(self, tmp: Path, text: str, size: int = 0) -> None:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in (("etc/greeting", text.encode()), ("usr/share/filler",
                                                                   b"x" * size)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("bin")
            link.type, link.linkname = tarfile.SYMTYPE, "usr/bin"
            tar.addfile(link)
        self.diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
        layer = gzip.compress(raw.getvalue(), mtime=0)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [self.diff_id]},
                             "config": {}}, sort_keys=True).encode()
        self.blobs: dict[str, Path] = {}
        self.layer = self._blob(tmp, layer)
        self.config = self._blob(tmp, config)
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.config, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": self.layer, "size": len(layer)}]}).encode()
        self.digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def _blob(self, tmp: Path, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = tmp / digest.replace(":", "-")
        path.write_bytes(data)
        self.blobs[digest] = path
        return digest

    def push(self, client: Registry, where: str) -> None:
        ref = parse_reference(where)
        for digest, path in self.blobs.items():
            client.push_blob(ref, path, digest)
        client.push_manifest(ref, ref.tag or self.digest, OCI_MANIFEST, self.manifest)
