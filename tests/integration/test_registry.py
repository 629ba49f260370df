"""The OCI distribution client against real registries (Debian's docker-registry on loopback):
push and pull by tag and digest over TLS with basic auth, every digest checked, content
changed in the registry's own storage refused, mirrors in order, a registry that is down."""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from stockade.image.errors import ImageRefused, ImageUnavailable
from stockade.image.reference import parse_reference
from stockade.image.registry import (
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    RegistryConfig,
)
from tests.support.images import Image
from tests.support.registry import RunningRegistry


def _client(reg: RunningRegistry, **config: Any) -> Registry:
    creds = {reg.host: reg.credentials} if reg.credentials else {}
    return Registry(RegistryConfig(**{"credentials": creds, "ca_file": reg.ca_file,
                                      "insecure": frozenset() if reg.ca_file
                                      else frozenset({reg.host}), **config}))


def _storage(reg: RunningRegistry, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return reg.base / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_push_then_pull_by_tag_and_by_digest(registry: RunningRegistry, tmp_path: Path) -> None:
    image = Image(tmp_path, "hello")
    client = _client(registry)
    image.push(client, f"{registry.host}/team/base:1.0")
    ref = parse_reference(f"{registry.host}/team/base:1.0")
    assert client.resolve(ref) == image.digest
    manifest = client.manifest(ref.with_digest(image.digest))
    assert manifest.digest == image.digest and manifest.config.digest == image.config
    assert [d.digest for d in manifest.layers] == [image.layer]
    out = tmp_path / "layer.tgz"
    with out.open("wb") as f:
        client.blob(ref, manifest.layers[0], f)
    assert gzip.decompress(out.read_bytes()).find(b"hello") > 0
    client.close()


def test_an_index_is_followed_to_the_linux_amd64_image(registry: RunningRegistry,
                                                        tmp_path: Path) -> None:
    image, other = Image(tmp_path, "indexed"), Image(tmp_path, "for arm")
    client = _client(registry)
    image.push(client, f"{registry.host}/team/multi@{image.digest}")
    other.push(client, f"{registry.host}/team/multi@{other.digest}")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": other.digest, "size": len(other.manifest),
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    ref = parse_reference(f"{registry.host}/team/multi:all")
    client.push_manifest(ref, "all", OCI_INDEX, index)
    pinned = ref.with_digest(client.resolve(ref))
    assert client.manifest(pinned).digest == image.digest
    client.close()


def test_a_registry_that_hands_out_bearer_tokens(token_registry: RunningRegistry,
                                                 tmp_path: Path) -> None:
    image = Image(tmp_path, "tokens")
    assert token_registry.tokens is not None
    realm = token_registry.tokens.realm.split("/")[2]
    # a realm on another host is used only if the operator names it
    bare = _client(token_registry)
    with pytest.raises(ImageUnavailable, match="401"):
        bare.resolve(parse_reference(f"{token_registry.host}/team/tok:1"))
    bare.close()
    client = _client(token_registry, auxiliary_hosts=frozenset({realm}))
    image.push(client, f"{token_registry.host}/team/tok:1")
    ref = parse_reference(f"{token_registry.host}/team/tok:1")
    assert client.manifest(ref.with_digest(client.resolve(ref))).digest == image.digest
    assert token_registry.tokens.issued == 2  # push, pull
    stranger = Registry(RegistryConfig(credentials={token_registry.host: ("ci", "nope")},
                                       ca_file=token_registry.ca_file,
                                       auxiliary_hosts=frozenset({realm})))
    with pytest.raises(ImageUnavailable, match="401"):
        stranger.resolve(ref)
    stranger.close()
    client.close()


def test_wrong_or_missing_credentials_are_refused(registry: RunningRegistry,
                                                  tmp_path: Path) -> None:
    ref = parse_reference(f"{registry.host}/team/base:1.0")
    for creds in ({registry.host: ("ci", "wrong")}, {}):
        client = Registry(RegistryConfig(credentials=creds, ca_file=registry.ca_file))
        with pytest.raises(ImageUnavailable, match="401") as refused:
            client.resolve(ref)
        assert "registry_auth_file" in refused.value.hint
        client.close()
    # and the registry's certificate is checked: without its CA, nothing is pulled
    client = Registry(RegistryConfig(credentials={registry.host: registry.credentials}))
    with pytest.raises(ImageUnavailable, match=r"(?i)certificate") as untrusted:
        client.resolve(ref)
    assert "registry_ca_file" in untrusted.value.hint
    client.close()


def test_content_changed_in_the_registry_is_refused(registry: RunningRegistry,
                                                    tmp_path: Path) -> None:
    image = Image(tmp_path, "genuine")
    client = _client(registry)
    image.push(client, f"{registry.host}/team/tampered:1.0")
    ref = parse_reference(f"{registry.host}/team/tampered@{image.digest}")
    manifest = client.manifest(ref)
    layer = _storage(registry, image.layer)
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ImageRefused, match="came with sha256"), \
            (tmp_path / "out").open("wb") as f:
        client.blob(ref, manifest.layers[0], f)
    stored = _storage(registry, image.digest)  # a swapped manifest under the same digest
    stored.write_bytes(stored.read_bytes().replace(b'"schemaVersion": 2',
                                                   b'"schemaVersion":  2'))
    with pytest.raises(ImageRefused, match="whose sha256 is"):
        client.manifest(ref)
    client.close()


def test_mirrors_are_tried_in_order_and_the_registry_last(
        registry: RunningRegistry, plain_registry: RunningRegistry, tmp_path: Path) -> None:
    image = Image(tmp_path, "mirrored")
    origin = _client(registry)
    image.push(origin, f"{registry.host}/team/app:2.0")
    ref = parse_reference(f"{registry.host}/team/app@{image.digest}")
    config = {"mirrors": {registry.host: (plain_registry.host,)},
              "insecure": frozenset({plain_registry.host}),
              "credentials": {registry.host: registry.credentials}}
    both = Registry(RegistryConfig(ca_file=registry.ca_file, **config))
    assert both.manifest(ref).digest == image.digest  # the mirror lacks it: the origin has it
    image.push(_client(plain_registry), f"{plain_registry.host}/team/app@{image.digest}")
    down = Registry(RegistryConfig(ca_file=registry.ca_file, **{
        **config, "mirrors": {"127.0.0.1:9": (plain_registry.host,)}}))
    moved = ref._replace(registry="127.0.0.1:9")  # the origin is down: the mirror serves
    assert down.manifest(moved).digest == image.digest
    both.close()
    down.close()


def test_a_registry_that_is_down_fails_fast(tmp_path: Path) -> None:
    client = Registry(RegistryConfig(insecure=frozenset({"127.0.0.1:9"})))
    started = time.monotonic()
    with pytest.raises(ImageUnavailable, match=re.escape("127.0.0.1:9")) as down:
        client.resolve(parse_reference("127.0.0.1:9/team/app:1"))
    assert time.monotonic() - started < 5
    assert "is the registry running" in down.value.hint
    client.close()


def test_unavailable_images_say_what_to_check(plain_registry: RunningRegistry) -> None:
    """A plain-HTTP registry spoken to over HTTPS, a tag it does not have: the error names
    the setting or the tag to check."""
    ref = parse_reference(f"{plain_registry.host}/team/app:nope")
    tls = Registry(RegistryConfig())
    with pytest.raises(ImageUnavailable) as plain:
        tls.resolve(ref)
    assert "insecure_registries" in plain.value.hint, plain.value.diagnostics()
    tls.close()
    client = _client(plain_registry)
    with pytest.raises(ImageUnavailable, match="has no tag nope") as missing:
        client.resolve(ref)
    assert "tag or digest" in missing.value.hint
    client.close()


class _Hostile:
    """A registry of the attacker's on loopback: its manifest route answers with ``reply``
    (status, headers, body, seconds between body bytes); and an "internal" service that
    counts who reaches it."""

    def __init__(self, reply: tuple[int, dict[str, str], bytes, float],
                 drip_head: bool = False) -> None:
        import http.server
        import threading

        outer = self
        self.internal_hits = 0

        class Registry(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers, body, drip = reply
                if drip_head:  # the status line and headers a byte at a time, then nothing
                    for byte in f"HTTP/1.1 {status} OK\r\nX-Slow: {'x' * 200}\r\n".encode():
                        try:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(drip)
                    return
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v.replace("INTERNAL", outer.internal))
                self.end_headers()
                for byte in body:
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:  # the client gave up (its deadline): as it should
                        return
                    time.sleep(drip)

            def log_message(self, *args: object) -> None:
                pass

        class Internal(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.internal_hits += 1
                body = b'{"token": "INTERNAL-SECRET"}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h)
                        for h in (Registry, Internal)]
        self.host = f"127.0.0.1:{self.servers[0].server_address[1]}"
        self.internal = f"127.0.0.1:{self.servers[1].server_address[1]}"
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("reply", [
    (401, {"WWW-Authenticate": 'Bearer realm="http://INTERNAL/creds",service="x"'}, b"", 0.0),
    (307, {"Location": "http://INTERNAL/latest/meta-data"}, b"", 0.0),
])
def test_a_registry_cannot_send_the_runner_elsewhere(reply: Any) -> None:
    hostile = _Hostile(reply)
    client = Registry(RegistryConfig(insecure=frozenset({hostile.host}),
                                     credentials={hostile.host: ("ci", "operator-secret")}))
    try:
        with pytest.raises(ImageUnavailable):
            client.resolve(parse_reference(f"{hostile.host}/team/app:1"))
        assert hostile.internal_hits == 0
    finally:
        client.close()
        hostile.close()


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_registry_that_answers_a_byte_at_a_time_runs_out_of_time(where: str) -> None:
    """Each read arrives within the read timeout, so only the deadline of the whole
    operation can end it: in the headers (httpx's own timeouts never do) as in the body."""
    hostile = _Hostile((200, {"Content-Type": OCI_MANIFEST}, b"{" + b" " * 200 + b"}", 0.5),
                       drip_head=where == "head")
    client = Registry(RegistryConfig(insecure=frozenset({hostile.host}))).within(2.0)
    started = time.monotonic()
    try:
        with pytest.raises(ImageUnavailable, match="out of time"):
            client.resolve(parse_reference(f"{hostile.host}/team/app:1"))
        assert time.monotonic() - started < 5
    finally:
        client.close()
        hostile.close()
