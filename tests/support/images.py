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

    def __init__(self, tmp: Path, text: str, size: int = 0,
                 files: dict[str, bytes | str] | None = None,
                 settings: dict[str, object] | None = None) -> None:
        """``files``: path -> bytes (a file, 0755) or ``"-> TARGET"`` (a symbolic link);
        by default a greeting, a filler of ``size`` bytes and ``bin -> usr/bin``. ``settings``:
        the image config's ``config`` (others: another image of the same layer)."""
        if files is None:
            files = {"etc/greeting": text.encode(), "usr/share/filler": b"x" * size,
                     "bin": "-> usr/bin"}
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.mtime, info.mode = 1_700_000_000, 0o755
                if isinstance(data, str):
                    info.type, info.linkname = tarfile.SYMTYPE, data.removeprefix("-> ")
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        self.diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
        layer = gzip.compress(raw.getvalue(), mtime=0)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [self.diff_id]},
                             "config": settings or {}}, sort_keys=True).encode()
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


BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one binary, no libraries
APPLETS = ("sh", "cat", "echo", "id", "ls", "test", "touch", "grep", "sleep", "mkdir", "head",
           "wc", "env", "true", "false", "readlink", "mount", "unshare", "mknod", "nc",
           "hostname", "chroot")


def busybox_image(tmp: Path, passwd: bytes | None = None, extra: dict[str, bytes | str] | None
                  = None) -> Image:
    """A runnable image: a static busybox and its applets, an /etc of its own (a user with
    the job's uid, a shadow file, a release name) and ``extra`` entries."""
    files: dict[str, bytes | str] = {"bin/busybox": BUSYBOX.read_bytes()}
    files |= {f"bin/{applet}": "-> busybox" for applet in APPLETS}
    files |= {"etc/os-release": b"ID=stockade-test\n",
              "etc/passwd": passwd if passwd is not None else
              b"root:x:0:0:root:/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/sh\n",
              "etc/group": b"root:x:0:\nubuntu:x:1000:\n",
              "etc/shadow": b"root:$6$secret:19000:0:99999:7:::\n",
              "etc/hosts": b"10.0.0.1 evil\n", "usr/local/bin/.keep": b""}
    return Image(tmp, "", files={**files, **(extra or {})})

