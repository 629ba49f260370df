"""The runner's image cache: images pulled by digest, unpacked once, shared read-only.

``$STOCKADE_HOME/images/`` (0700, root's): ``trees/<chain id>/`` holds one flattened root
file system per chain of layers (the OCI chain ID of their DiffIDs: two images with the same
layers share a tree), published by an atomic rename once every layer was checked and applied;
``images/<manifest digest>.json`` records an image (its reference, config, chain id, size,
last use), and ``images/<index digest>.index`` the manifest digest an index pinned by a
job led to. A pull of a digest that is recorded and whose tree exists touches nothing remote:
it works while the registry is down. Pulls of one digest take turns (``locks/``). When the
trees exceed ``image_cache_bytes``, the least recently used images not in use are evicted
(:meth:`ImageCache.prune`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from stockade.hashing import sha256
from stockade.image.errors import ImageRefused, ImageUnavailable
from stockade.image.reference import ImageRef
from stockade.liveness import lock_is_free

if TYPE_CHECKING:
    from stockade.image.registry import Registry

MAX_TOP_LEVEL = 512  # entries at an image's root (each is one bind of the job's root)
LOCK_POLL_S = 0.05  # how often a pull that waits with a deadline tries the image's lock again
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json")


class CachedImage(NamedTuple):
    """An image in the cache."""

    digest: str  # the manifest's
    reference: str  # as it was pulled (registry/repository@digest)
    chain_id: str
    rootfs: Path
    config: dict[str, Any]  # the image config's "config" (Env, WorkingDir, User, ...)
    size: int  # bytes of its tree
    last_used: float


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI chain ID of layers with these DiffIDs."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


class ImageCache:
    """The cache under ``root`` (see the module docstring), at most ``limit`` bytes."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = root, limit
        for sub in ("", "trees", "images", "locks", "tmp"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    def get(self, digest: str) -> CachedImage | None:
        """The cached image with this manifest digest (or the digest of the index it was
        pulled by), if its tree is there."""
        record = self.root / "images" / f"{_hex(digest)}.json"
        try:
            if not record.exists():  # an index pulled before: the manifest it led to
                record = self.root / "images" / f"{_hex(self._alias(digest))}.json"
            doc = json.loads(record.read_text())
            image = CachedImage(doc["digest"], doc["reference"], doc["chain_id"],
                                self.root / "trees" / _hex(doc["chain_id"]), doc["config"],
                                int(doc["size"]), float(doc["last_used"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return image if image.rootfs.is_dir() else None

    def cached(self, ref: ImageRef, until: float = math.inf) -> CachedImage | None:
        """The image ``ref`` (pinned) pins if the cache has it from the same repository
        (marked used now), else None: what :meth:`pull` returns without pulling. A pull of
        it under way is waited for until ``until`` (time.monotonic(); ImageUnavailable)."""
        if not ref.digest:
            raise ValueError("look up a pinned reference")
        with self._lock(ref.digest, until=until):
            return self._cached(ref)

    def _cached(self, ref: ImageRef) -> CachedImage | None:
        assert ref.digest
        found = self.get(ref.digest)
        if found is None or _repository(found.reference) != _repository(str(ref)):
            return None
        return self._touch(found)

    def pull(self, registry: Registry, ref: ImageRef) -> tuple[CachedImage, bool]:
        """The image ``ref`` (pinned) pins, from the cache or pulled, checked and unpacked;
        and whether it was pulled now."""
        if not ref.digest:
            raise ValueError("pull a pinned reference")
        with self._lock(ref.digest, until=registry.deadline):  # (another pull's: its time)
            found = self._cached(ref)
            if found is not None:
                return found, False
            image = self._pull(registry, ref)  # (the same content pulled from elsewhere: the
            # job's own registry must have it too, layers and all; its tree is used again)
            if image.digest != ref.digest:  # pinned by its index: found by it next time
                self._write(self._alias_path(ref.digest), image.digest)
        self.prune(keep=(image.digest,))
        return image, True

    def _pull(self, registry: Registry, ref: ImageRef) -> CachedImage:
        import tempfile

        from stockade.image.layers import unpack_image

        manifest = registry.manifest(ref)
        if manifest.config.media_type not in CONFIG_TYPES:
            raise ImageRefused(f"image {ref} has no image config")
        with tempfile.TemporaryDirectory(dir=self.root / "tmp") as tmp:
            config_path = Path(tmp) / "config.json"
            with config_path.open("w+b") as f:  # (its descriptor is bounded by the manifest's)
                registry.blob(ref, manifest.config, f)
            config = _config(config_path.read_bytes(), ref)
            diff_ids = config["rootfs"]["diff_ids"]
            if len(diff_ids) != len(manifest.layers) or not diff_ids:
                raise ImageRefused(f"image {ref}: its config lists {len(diff_ids)} layers, its "
                                   f"manifest {len(manifest.layers)}")
            chain = chain_id(diff_ids)
            tree = self.root / "trees" / _hex(chain)
            self._check_room(ref, sum(layer.size for layer in manifest.layers))
            layers = []
            for n, layer in enumerate(manifest.layers):
                path = Path(tmp) / f"layer-{n}"
                with path.open("wb") as f:
                    registry.blob(ref, layer, f)
                layers.append((path, layer.media_type, diff_ids[n]))
            # the tree is found or made, and the image recorded, under the tree's lock: a
            # prune removes a tree only under it, once no image record names the tree
            with self._tree_lock(chain):
                if tree.is_dir():  # (the DiffIDs a config claims are not proof: its layers)
                    _check_diff_ids(ref, layers)
                else:
                    unpack_image(layers, tree)
                top = sum(1 for _ in os.scandir(tree))
                if top > MAX_TOP_LEVEL:
                    if not any(i.chain_id == chain for i in self.images()):
                        self._remove_tree(tree)
                    raise ImageRefused(f"image {ref} has {top} entries at its root, more than "
                                       f"the {MAX_TOP_LEVEL} a job's root may have")
                image = CachedImage(manifest.digest, str(ref.with_digest(manifest.digest)),
                                    chain, tree, dict(config.get("config") or {}),
                                    _tree_size(tree), time.time())
                self._record(image)
        return image

    def _alias_path(self, digest: str) -> Path:
        return self.root / "images" / f"{_hex(digest)}.index"

    def _alias(self, digest: str) -> str:
        """The manifest digest the index ``digest`` led to (OSError if none is recorded)."""
        return self._alias_path(digest).read_text(encoding="ascii").strip()

    def use(self, digest: str, until: float = math.inf) -> int | None:
        """Mark the image in use by a job until the returned descriptor is closed (a shared
        lock): :meth:`prune` never evicts a tree a running job stands on. None if the image
        was evicted since it was looked up (taken under the image's lock, which a prune of it
        holds while it checks for users: no prune slips in between; waited for as in
        :meth:`cached`)."""
        with self._lock(digest, until=until):
            if self.get(digest) is None:
                return None
            fd = os.open(self._use_path(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            return fd

    def _use_path(self, digest: str) -> Path:
        return self.root / "locks" / f"{_hex(digest)}.use"

    def _check_room(self, ref: ImageRef, size: int) -> None:
        """Refuse an image whose layers cannot fit (the cache's limit, the disk's free space)
        before downloading any of them."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if size > self.limit or size * 2 > free:
            raise ImageRefused(f"image {ref} has {size} bytes of layers; the cache holds "
                               f"{self.limit} and the disk has {free} free")

    def images(self) -> list[CachedImage]:
        """Every cached image, the most recently used first."""
        found = (self.get(f"sha256:{p.stem}") for p in (self.root / "images").glob("*.json"))
        return sorted((i for i in found if i is not None), key=lambda i: -i.last_used)

    def prune(self, keep: Sequence[str] = (), everything: bool = False) -> list[CachedImage]:
        """Evict the least recently used images (all with ``everything``) until the trees fit
        in the limit, never those in ``keep``, being pulled or in use by a job (nor a tree
        another cached image shares); the evicted ones."""
        images = self.images()
        used = sum({i.chain_id: i.size for i in images}.values())
        evicted = []
        for image in reversed(images):
            if not everything and used <= self.limit:
                break
            if image.digest in keep or lock_is_free(self._use_path(image.digest)) is False:
                continue
            with self._lock(image.digest, wait=False) as locked:
                # (users are checked again under the lock: use() takes theirs under it)
                if not locked or lock_is_free(self._use_path(image.digest)) is False:
                    continue
                (self.root / "images" / f"{_hex(image.digest)}.json").unlink(missing_ok=True)
            images.remove(image)
            evicted.append(image)
            # its tree, unless another image names it: read again under the tree's lock, which
            # a pull holds from finding or making a tree until it has recorded its image
            with self._tree_lock(image.chain_id):
                if not any(i.chain_id == image.chain_id for i in self.images()):
                    self._remove_tree(image.rootfs)
                    used -= image.size
        for alias in (self.root / "images").glob("*.index") if evicted else ():
            with contextlib.suppress(OSError, ValueError):  # (those that lead nowhere now)
                if not (self.root / "images" / f"{_hex(alias.read_text().strip())}.json"
                        ).exists():
                    alias.unlink()
        self._remove_leftovers()
        return evicted

    def _remove_leftovers(self) -> None:
        """Trees no image record names and unpacks nobody finishes: what a process killed
        between a prune's two steps, or during an unpack, left (each under its tree's lock,
        which the pull or prune at work on it holds)."""
        named = {_hex(i.chain_id) for i in self.images()}
        for entry in os.scandir(self.root / "trees"):
            name = entry.name
            partial = name.startswith(".") and name.endswith(".partial")
            chain = name[1:].split(".", 1)[0] if partial else name
            if (not partial and chain in named) or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(ValueError), self._tree_lock(f"sha256:{chain}",
                                                                  wait=False) as locked:
                if locked and (partial or not any(
                        _hex(i.chain_id) == chain for i in self.images())):
                    self._remove_tree(Path(entry.path))

    def _remove_tree(self, tree: Path) -> None:
        gone = self.root / "tmp" / f"gone-{tree.name}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(tree, gone)  # out of sight at once, then removed
            shutil.rmtree(gone, ignore_errors=True)

    def _touch(self, image: CachedImage) -> CachedImage:
        image = image._replace(last_used=time.time())
        self._record(image)
        return image

    def _record(self, image: CachedImage) -> None:
        doc = {"digest": image.digest, "reference": image.reference, "chain_id": image.chain_id,
               "config": image.config, "size": image.size, "last_used": image.last_used}
        self._write(self.root / "images" / f"{_hex(image.digest)}.json",
                    json.dumps(doc, sort_keys=True))

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    @contextlib.contextmanager
    def _tree_lock(self, chain: str, wait: bool = True) -> Iterator[bool]:
        """The lock of the tree of ``chain`` (exclusive; taken after an image's lock, never
        before: see :meth:`_pull` and :meth:`prune`); False at once if it is taken and not
        ``wait``."""
        fd = os.open(self.root / "locks" / f"{_hex(chain)}.tree",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _lock(self, digest: str, wait: bool = True, until: float = math.inf
              ) -> Iterator[bool]:
        """The image's lock: False at once if it is taken and not ``wait``; waited for until
        ``until`` (time.monotonic()), then ImageUnavailable: a pull of the image holds it,
        and a registry that answers slowly must not hold every job that wants the image."""
        fd = os.open(self.root / "locks" / f"{_hex(digest)}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (
                        0 if wait and math.isinf(until) else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    if time.monotonic() >= until:
                        raise ImageUnavailable(
                            f"image {digest} is being pulled by another job or command, "
                            "which did not finish in the time this one had",
                            hint="run it again once that pull is over (a registry that "
                                 "answers slowly holds it: check the registry)") from None
                    time.sleep(LOCK_POLL_S)
            yield True
        finally:
            os.close(fd)


def _check_diff_ids(ref: ImageRef, layers: Sequence[tuple[Path, str, str]]) -> None:
    """Each downloaded layer's DiffID is the one the config names (ImageRefused otherwise):
    an image is run on a cached tree only if its own layers make that tree."""
    from stockade.image.layers import layer_diff_id

    for number, (path, media_type, expected) in enumerate(layers, 1):
        with path.open("rb") as f:
            got = layer_diff_id(f, media_type)
        if got != expected:
            raise ImageRefused(f"image {ref}: layer {number}: its DiffID is {got}, not the "
                               f"{expected} of the image config")


def _repository(reference: str) -> str:
    """``registry/repository`` of a pinned reference."""
    return reference.split("@", 1)[0]


def _hex(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef"
                                                            for c in value):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return value


def _config(raw: bytes, ref: ImageRef) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        diff_ids = doc["rootfs"]["diff_ids"]
        ok = isinstance(diff_ids, list) and all(isinstance(d, str) and len(d) == 71
                                                and d.startswith("sha256:") for d in diff_ids)
    except (ValueError, KeyError, TypeError, RecursionError):
        ok = False
    if not ok or not isinstance(doc.get("config", {}), dict | None):
        raise ImageRefused(f"image {ref}: its config is malformed")
    return dict(doc)


def _tree_size(tree: Path) -> int:
    """The bytes a tree takes (its links are never followed, not even to stat them)."""
    total, todo = 0, [str(tree)]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total
