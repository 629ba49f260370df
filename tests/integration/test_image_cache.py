"""The runner's image cache against a real registry: pulled by digest and unpacked once, shared
by images with the same layers, used while the registry is down, evicted least recently used
first; and ``stockade image`` as a user runs it."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from stockade.image.cache import ImageCache, chain_id
from stockade.image.errors import ImageUnavailable
from stockade.image.reference import parse_reference
from stockade.image.registry import Registry, RegistryConfig
from tests.conftest import run_cli
from tests.support.images import Image
from tests.support.registry import RunningRegistry


def _client(reg: RunningRegistry) -> Registry:
    assert reg.credentials is not None
    return Registry(RegistryConfig(credentials={reg.host: reg.credentials},
                                   ca_file=reg.ca_file))


def test_a_pulled_image_is_cached_and_used_while_the_registry_is_down(
        registry: RunningRegistry, tmp_path: Path) -> None:
    image = Image(tmp_path, "cached")
    client = _client(registry)
    image.push(client, f"{registry.host}/cache/one:1")
    cache = ImageCache(tmp_path / "images", 1 << 30)
    ref = parse_reference(f"{registry.host}/cache/one@{image.digest}")
    pulled, fresh = cache.pull(client, ref)
    assert fresh
    assert (pulled.rootfs / "etc/greeting").read_text() == "cached"
    assert (pulled.rootfs / "bin").readlink() == Path("usr/bin")
    assert pulled.chain_id == chain_id([image.diff_id]) == image.diff_id
    assert (tmp_path / "images").stat().st_mode & 0o777 == 0o700
    client.close()
    offline = Registry(RegistryConfig())  # no credentials, no CA: any request would fail
    again, fresh = cache.pull(offline, ref)
    assert not fresh and again.rootfs == pulled.rootfs and again.last_used >= pulled.last_used
    started = time.monotonic()
    with pytest.raises(ImageUnavailable):
        cache.pull(offline, ref._replace(digest="sha256:" + "1" * 64))
    assert time.monotonic() - started < 5
    # the same content named in another repository is not taken from the cache unchecked
    with pytest.raises(ImageUnavailable):
        cache.pull(offline, ref._replace(repository="cache/other"))


def test_the_least_recently_used_images_are_evicted(registry: RunningRegistry,
                                                     tmp_path: Path) -> None:
    client = _client(registry)
    images = [Image(tmp_path, f"image {n}", size=200_000) for n in range(3)]
    cache = ImageCache(tmp_path / "images", 450_000)  # room for two
    for n, image in enumerate(images):
        image.push(client, f"{registry.host}/cache/lru:{n}")
    pulled = [cache.pull(client, parse_reference(f"{registry.host}/cache/lru@{i.digest}"))[0]
              for i in images]
    left = {i.digest for i in cache.images()}
    assert images[0].digest not in left and left == {images[1].digest, images[2].digest}
    assert not pulled[0].rootfs.exists() and pulled[2].rootfs.is_dir()
    held = cache.use(images[1].digest)  # a job stands on it: never evicted meanwhile
    assert held is not None
    assert [i.digest for i in cache.prune(everything=True)] == [images[2].digest]
    assert pulled[1].rootfs.is_dir()
    os.close(held)
    assert [i.digest for i in cache.prune(everything=True)] == [images[1].digest]
    assert cache.images() == [] and not list((tmp_path / "images" / "trees").iterdir())
    # looked up, then evicted before the job marked it used: use() says so, nothing is bound
    assert cache.use(images[1].digest) is None
    client.close()


def test_a_prune_checks_for_users_under_the_image_lock(registry: RunningRegistry,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that marks the image used after prune's first look (which found no user) and
    before prune takes the image's lock keeps its image."""
    from stockade.image import cache as cache_module

    client = _client(registry)
    image = Image(tmp_path, "raced")
    image.push(client, f"{registry.host}/cache/race:1")
    cache = ImageCache(tmp_path / "images", 1 << 30)
    pulled, _ = cache.pull(client, parse_reference(f"{registry.host}/cache/race@{image.digest}"))
    real, held = cache_module.lock_is_free, []

    def first_look_then_a_job_starts(path: Path) -> bool | None:
        if not held:  # prune's first look: free; then the job takes its use lock
            free = real(path)
            fd = cache.use(image.digest)
            assert fd is not None
            held.append(fd)
            return free
        return real(path)

    monkeypatch.setattr(cache_module, "lock_is_free", first_look_then_a_job_starts)
    assert cache.prune(everything=True) == []
    assert pulled.rootfs.is_dir() and [i.digest for i in cache.images()] == [image.digest]
    os.close(held[0])
    client.close()


def test_a_prune_keeps_a_tree_another_image_recorded_meanwhile_stands_on(
        registry: RunningRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images A and B share their one layer (one tree). A prune that listed only A evicts A
    while a job pulls B and marks it used: the tree stays, B's job stands on it."""
    from stockade.image import cache as cache_module

    client = _client(registry)
    a = Image(tmp_path, "shared")
    b = Image(tmp_path, "shared", settings={"Env": ["WHICH=b"]})
    assert a.diff_id == b.diff_id and a.digest != b.digest
    a.push(client, f"{registry.host}/cache/shared:a")
    b.push(client, f"{registry.host}/cache/shared:b")
    cache = ImageCache(tmp_path / "images", 1 << 30)
    pulled_a, _ = cache.pull(client, parse_reference(f"{registry.host}/cache/shared@{a.digest}"))
    real, held = cache_module.lock_is_free, []

    def a_job_pulls_b_meanwhile(path: Path) -> bool | None:
        if not held:  # prune's first look at A (its list has A only); then B is pulled
            pulled_b, _ = cache.pull(client, parse_reference(
                f"{registry.host}/cache/shared@{b.digest}"))
            fd = cache.use(pulled_b.digest)
            assert fd is not None and pulled_b.rootfs == pulled_a.rootfs
            held.append(fd)
        return real(path)

    monkeypatch.setattr(cache_module, "lock_is_free", a_job_pulls_b_meanwhile)
    assert [i.digest for i in cache.prune(everything=True)] == [a.digest]
    assert pulled_a.rootfs.is_dir(), "the tree B's job stands on was removed"
    assert [i.digest for i in cache.images()] == [b.digest]
    os.close(held[0])
    client.close()


def test_the_image_command(registry: RunningRegistry, tmp_path: Path) -> None:
    stockade_home = tmp_path / "home"
    image = Image(tmp_path, "from the cli")
    image.push(_client(registry), f"{registry.host}/cli/app:v1")
    assert registry.credentials is not None
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {registry.host: {"auth": base64.b64encode(
        ":".join(registry.credentials).encode()).decode()}}}))
    auth.chmod(0o600)
    env = {"STOCKADE_REGISTRY_AUTH_FILE": str(auth),
           "STOCKADE_REGISTRY_CA_FILE": str(registry.ca_file)}
    pulled = run_cli(stockade_home, "image", "pull", f"{registry.host}/cli/app:v1", **env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.splitlines()[-1] == f"{registry.host}/cli/app@{image.digest}"
    listed = run_cli(stockade_home, "image", "list", "--json")
    assert [i["digest"] for i in json.loads(listed.stdout)] == [image.digest]
    shown = run_cli(stockade_home, "image", "inspect", image.digest, "--json")
    assert json.loads(shown.stdout)["chain_id"] == image.diff_id
    by_tag = run_cli(stockade_home, "image", "inspect", f"{registry.host}/cli/app:v1", **env)
    assert by_tag.returncode == 0, by_tag.stderr
    assert json.loads(by_tag.stdout)["digest"] == image.digest
    no_tag = run_cli(stockade_home, "image", "inspect", f"{registry.host}/cli/app:v9", **env)
    assert no_tag.returncode == 4 and "by its digest" in no_tag.stderr, no_tag.stderr
    bad = run_cli(stockade_home, "image", "pull", "debian:12", **env)
    assert bad.returncode == 2 and "name the registry" in bad.stderr
    missing = run_cli(stockade_home, "image", "pull", f"{registry.host}/cli/app:v2", **env)
    assert missing.returncode == 4 and "not available" in missing.stderr
    assert "Traceback" not in missing.stderr + bad.stderr
    gone = run_cli(stockade_home, "image", "prune", "--all")
    assert gone.returncode == 0 and "1 image(s) evicted" in gone.stdout


def test_a_pull_waits_for_another_pull_of_the_image_only_within_its_own_time(
        registry: RunningRegistry, tmp_path: Path) -> None:
    """Another pull of the same image (one a slow registry holds) keeps its lock: a pull or a
    job's lookup with less time gives up at its own deadline, image unavailable, instead of
    waiting for it."""
    from stockade.image.cache import LOCK_POLL_S

    client = _client(registry).within(0.5)
    cache = ImageCache(tmp_path / "images", 1 << 30)
    ref = parse_reference(f"{registry.host}/cache/busy@sha256:{'2' * 64}")
    with cache._lock(ref.digest):  # the other pull, under way
        started = time.monotonic()
        with pytest.raises(ImageUnavailable, match="being pulled by another"):
            cache.pull(client, ref)
        with pytest.raises(ImageUnavailable, match="being pulled by another"):
            cache.cached(ref, until=time.monotonic() + 0.2)
        assert time.monotonic() - started < 5 + 4 * LOCK_POLL_S
    with pytest.raises(ImageUnavailable):  # free again: the registry's own answer now
        cache.pull(client, ref)
    client.close()


def test_a_prune_removes_what_killed_pulls_and_prunes_left(registry: RunningRegistry,
                                                           tmp_path: Path) -> None:
    """A tree no image record names (a process killed between a prune's two steps, or after
    unpacking and before recording) and an unfinished unpack are removed; a tree an image
    names, and an unpack whose pull still holds the tree's lock, are not."""
    client = _client(registry)
    image = Image(tmp_path, "kept")
    image.push(client, f"{registry.host}/cache/kept:1")
    cache = ImageCache(tmp_path / "images", 1 << 30)
    kept, _ = cache.pull(client, parse_reference(f"{registry.host}/cache/kept@{image.digest}"))
    trees = tmp_path / "images" / "trees"
    orphan, stale, busy = "a" * 64, "b" * 64, "c" * 64
    (trees / orphan / "etc").mkdir(parents=True)
    (trees / f".{stale}.x1.partial" / "usr").mkdir(parents=True)
    (trees / f".{busy}.x2.partial").mkdir()
    with cache._tree_lock(f"sha256:{busy}"):  # an unpack under way (its pull holds it)
        assert cache.prune() == []
    assert sorted(p.name for p in trees.iterdir()) == [f".{busy}.x2.partial",
                                                       kept.rootfs.name]
    assert kept.rootfs.is_dir() and [i.digest for i in cache.images()] == [image.digest]
    client.close()
