"""A client of the OCI distribution API (https://github.com/opencontainers/distribution-spec):
what the runner needs to pull an image by digest, and what ``stockade image push`` needs.

Every byte from a registry is checked before it is used: a manifest's sha256 must be the
digest asked for (a tag is resolved by hashing the manifest the registry returns, never by
trusting its ``Docker-Content-Digest`` header), a blob is streamed to a file and its sha256
and size must match its descriptor, and every size is bounded before it is read. Sources are
tried in order (the operator's mirrors of a registry, then the registry itself); a source that
fails (unreachable, 5xx) is retried a few times with backoff, one that does not have the
content (404) is skipped at once. Credentials come from the operator's settings (never from a
job) and go only to the host they are for: HTTP basic, or the bearer-token exchange the
registry asks for with ``WWW-Authenticate``. Plain HTTP is spoken only to registries the
operator lists as insecure.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from stockade.image.errors import ImageRefused, ImageUnavailable
from stockade.image.reference import ImageRef

if TYPE_CHECKING:
    import ssl

    import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CHUNK = 1024 * 1024
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryConfig(NamedTuple):
    """The operator's registry settings."""

    credentials: Mapping[str, tuple[str, str]] = {}  # host[:port] -> (user, password)
    insecure: frozenset[str] = frozenset()  # hosts spoken to over plain HTTP (loopback tests)
    mirrors: Mapping[str, tuple[str, ...]] = {}  # registry -> mirrors, tried first, in order
    ca_file: str | None = None  # extra CA bundle (PEM) for registries' certificates
    attempts: int = 3  # per source, for unreachable/5xx
    timeout_s: float = 30.0  # one read
    # other hosts a registry may send the runner to (its token service, its blob storage):
    # any other realm or redirect is refused (a registry must not make the runner fetch
    # what it likes, nor get the operator's credentials sent elsewhere)
    auxiliary_hosts: frozenset[str] = frozenset()


class Descriptor(NamedTuple):
    """A content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, doc: Any, max_size: int) -> Descriptor:
        """From a manifest's JSON (ImageRefused if malformed or over ``max_size``)."""
        try:
            d = cls(str(doc["mediaType"]), str(doc["digest"]), doc["size"])
        except (KeyError, TypeError):
            raise ImageRefused("a descriptor in the manifest is malformed") from None
        if not _DIGEST.match(d.digest) or type(d.size) is not int or d.size < 0:
            raise ImageRefused("a descriptor in the manifest is malformed")
        if d.size > max_size:
            raise ImageRefused(f"blob {d.digest} is {d.size} bytes, over the {max_size} allowed")
        return d


class Manifest(NamedTuple):
    """An image manifest: its digest, config and layers."""

    digest: str
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]


class Registry:
    """Pulls and pushes through the sources :class:`RegistryConfig` names."""

    def __init__(self, config: RegistryConfig, max_blob_bytes: int = 8 << 30,
                 max_layers: int = 128) -> None:
        self.config, self.max_blob_bytes, self.max_layers = config, max_blob_bytes, max_layers
        self._clients: dict[str, httpx.Client] = {}
        self._plain: httpx.Client | None = None  # for redirects to blob storage
        self.deadline = float("inf")  # time.monotonic() by which the operation must end
        self._tokens: dict[tuple[str, str], str] = {}  # (host, scope) -> bearer token

    def within(self, seconds: float) -> Registry:
        """Give what this client does from now on ``seconds`` in all (every try and read):
        a registry that answers a byte at a time cannot hold a runner or a server."""
        self.deadline = time.monotonic() + seconds
        return self

    def _left(self, host: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _SourceFailed(f"{host}: out of time")
        return left

    def close(self) -> None:
        """Close the connections."""
        for client in (*self._clients.values(), *([self._plain] if self._plain else [])):
            client.close()
        self._clients.clear()
        self._plain = None

    # -- pulling --------------------------------------------------------------------------

    def resolve(self, ref: ImageRef) -> str:
        """The digest ``ref`` names (its tag resolved at the first source that has it)."""
        if ref.digest:
            return ref.digest
        _, _, digest = self._manifest(ref, str(ref.tag), None)
        return digest

    def manifest(self, ref: ImageRef, platform: tuple[str, str] = ("linux", "amd64")
                 ) -> Manifest:
        """The image manifest of pinned ``ref`` (an index is followed to ``platform``'s)."""
        if not ref.digest:
            raise ValueError("pin the reference first (resolve)")
        media_type, raw, digest = self._manifest(ref, ref.digest, ref.digest)
        doc = _json(raw, digest)
        if media_type in INDEXES or doc.get("manifests") is not None:
            chosen = _pick(doc, platform, digest)
            media_type, raw, digest = self._manifest(ref, chosen, chosen)
            doc = _json(raw, digest)
        if media_type not in MANIFESTS:
            raise ImageRefused(f"manifest {digest} is not an image manifest")
        layers = doc.get("layers")
        if not isinstance(layers, list) or len(layers) > self.max_layers:
            raise ImageRefused(f"manifest {digest} has no layer list or more than "
                               f"{self.max_layers} layers")
        return Manifest(digest, media_type, raw,
                        Descriptor.of(doc.get("config"), MAX_MANIFEST_BYTES),
                        tuple(Descriptor.of(d, self.max_blob_bytes) for d in layers))

    def blob(self, ref: ImageRef, d: Descriptor, out: BinaryIO) -> None:
        """Write blob ``d`` of ``ref``'s repository to ``out`` (ImageRefused if its bytes or
        size differ from the descriptor's; ``out`` is then incomplete)."""
        problems = []
        for source in self._sources(ref):
            try:
                with self._request(source, "GET", f"/v2/{ref.repository}/blobs/{d.digest}",
                                   ref.repository) as response:
                    if response.status_code == 404:
                        problems.append(f"{source}: no blob {d.digest}")
                        continue
                    _check_status(response, source)
                    out.seek(0)
                    out.truncate()
                    _copy_checked(self._timed(source, response.iter_bytes()), out, d)
                    return
            except _SourceFailed as e:
                problems.append(str(e))
        raise ImageUnavailable(f"blob {d.digest} of {ref} is not available: "
                               + "; ".join(problems))

    def _manifest(self, ref: ImageRef, reference: str, digest: str | None
                  ) -> tuple[str, bytes, str]:
        """``(media type, bytes, digest)`` of manifest ``reference`` from the first source
        that has it; with ``digest``, its bytes must hash to it."""
        found = self._fetch_manifest(ref, reference, digest, MAX_MANIFEST_BYTES, False)
        assert found is not None  # (only an absent_ok fetch finds nothing)
        return found

    def find_manifest(self, ref: ImageRef, tag: str, limit: int = MAX_MANIFEST_BYTES
                      ) -> tuple[str, bytes, str] | None:
        """``(media type, bytes, sha256 digest)`` of the manifest ``tag`` (a tag, or a digest
        the caller compares with the one returned) in ``ref``'s repository, as the first
        source that has it sends it (at most ``limit`` bytes; an index is returned, not
        followed); None when the registry itself says it has no such manifest (a mirror's 404
        does not mean that: mirrors may lag)."""
        return self._fetch_manifest(ref, tag, None, limit, True)

    def _fetch_manifest(self, ref: ImageRef, reference: str, digest: str | None, limit: int,
                        absent_ok: bool) -> tuple[str, bytes, str] | None:
        problems = []
        accept = ", ".join((*MANIFESTS, *INDEXES))
        for source in self._sources(ref):
            try:
                with self._request(source, "GET", f"/v2/{ref.repository}/manifests/{reference}",
                                   ref.repository, headers={"Accept": accept}) as response:
                    if response.status_code == 404:
                        what = "manifest" if _DIGEST.match(reference) else "tag"
                        problems.append(f"{source}: has no {what} {reference}")
                        if absent_ok and source == ref.registry:
                            return None
                        continue
                    _check_status(response, source)
                    raw = _read_bounded(self._timed(source, response.iter_bytes()), limit,
                                        f"manifest {reference}")
                    media_type = response.headers.get("content-type", "").split(";")[0].strip()
            except _SourceFailed as e:
                problems.append(str(e))
                continue
            got = "sha256:" + hashlib.sha256(raw).hexdigest()
            if digest is not None and got != digest:
                raise ImageRefused(f"{source} sent a manifest for {digest} whose sha256 is "
                                   f"{got}: refused")
            doc = _json(raw, got)
            return str(doc.get("mediaType") or media_type), raw, got
        at = "@" if _DIGEST.match(reference) else ":"  # (a digest is not a tag)
        said = "; ".join(problems)
        raise ImageUnavailable(f"{ref.registry}/{ref.repository}{at}{reference} is not "
                               f"available: {said}", hint=_hint(said))

    # -- pushing --------------------------------------------------------------------------

    def push_blob(self, ref: ImageRef, path: Path, digest: str) -> None:
        """Upload the file ``path`` (whose sha256 is ``digest``) unless the registry has it."""
        with path.open("rb") as f:
            self._upload(ref, digest, path.stat().st_size, iter(lambda: f.read(CHUNK), b""))

    def push_bytes(self, ref: ImageRef, data: bytes) -> str:
        """Upload ``data`` as a blob unless the registry has it; its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._upload(ref, digest, len(data), data)
        return digest

    def _upload(self, ref: ImageRef, digest: str, size: int,
                content: bytes | Iterator[bytes]) -> None:
        source, repo = ref.registry, ref.repository
        with self._request(source, "HEAD", f"/v2/{repo}/blobs/{digest}", repo,
                           push=True) as found:
            if found.status_code == 200:
                return
        with self._request(source, "POST", f"/v2/{repo}/blobs/uploads/", repo,
                           push=True) as started:
            _check_status(started, source, (202,))
            location = started.headers.get("location", "")
        if not location:
            raise ImageUnavailable(f"{source} gave no upload location")
        target = f"{location}{'&' if '?' in location else '?'}digest={digest}"
        with self._request(source, "PUT", target, repo, push=True, content=content,
                           headers={"Content-Type": "application/octet-stream",
                                    "Content-Length": str(size)}) as done:
            _check_status(done, source, (201,))

    def push_manifest(self, ref: ImageRef, reference: str, media_type: str, raw: bytes) -> str:
        """Put manifest ``raw`` under ``reference`` (a tag or its digest); its digest."""
        source, repo = ref.registry, ref.repository
        with self._request(source, "PUT", f"/v2/{repo}/manifests/{reference}", repo,
                           push=True, content=raw,
                           headers={"Content-Type": media_type}) as done:
            _check_status(done, source, (201,))
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    # -- HTTP -----------------------------------------------------------------------------

    def _sources(self, ref: ImageRef) -> Iterator[str]:
        yield from self.config.mirrors.get(ref.registry, ())
        yield ref.registry

    def _client(self, host: str) -> httpx.Client:
        import httpx

        if host not in self._clients:
            scheme = "http" if host in self.config.insecure else "https"
            self._clients[host] = httpx.Client(
                base_url=f"{scheme}://{host}", transport=self._transport(),
                timeout=self.config.timeout_s, follow_redirects=False, trust_env=False,
                headers={"User-Agent": "stockade"})
        return self._clients[host]

    def _transport(self) -> httpx.HTTPTransport:
        """Connections with the system's CAs (and the operator's), that keep to the deadline
        even when the registry answers a byte at a time (image/deadline.py)."""
        from stockade.image.deadline import transport

        return transport(self._verify(), lambda: self.deadline)

    def _verify(self) -> ssl.SSLContext:
        """The TLS context: the system's CAs, and the operator's extra bundle if any."""
        import ssl

        context = ssl.create_default_context()
        if self.config.ca_file:
            context.load_verify_locations(cafile=self.config.ca_file)
        return context

    def _request(self, host: str, method: str, url: str, repository: str,
                 push: bool = False, **kwargs: Any) -> _Answer:
        return _Answer(self, host, method, url, repository, push, kwargs)

    def _timed(self, host: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``chunks`` of a body while there is time; a read that fails (too slow, the
        connection lost) fails this source."""
        import httpx

        try:
            for chunk in chunks:
                self._left(host)
                yield chunk
        except httpx.HTTPError as e:
            raise _SourceFailed(f"{host}: {type(e).__name__}: {str(e)[:200]}") from None

    def _send(self, host: str, method: str, url: str, repository: str, push: bool,
              kwargs: dict[str, Any]) -> httpx.Response:
        """One request with retries (unreachable, 5xx, 429) and authentication (basic, or a
        bearer token for the repository's scope); the response is streamed. A redirect of a
        GET (blob storage) is followed without our credentials."""
        import httpx

        client = self._client(host)
        if not _same_origin(str(client.base_url), url):
            raise _SourceFailed(f"{host}: sent us to another host ({url[:100]!r}): refused")
        scope = f"repository:{repository}:{'pull,push' if push else 'pull'}"
        delay, tried_auth, attempt = 0.2, False, 0
        while True:
            headers = dict(kwargs.get("headers") or {})
            auth = self._authorization(host, scope)
            if auth:
                headers["Authorization"] = auth
            timeout = min(self.config.timeout_s, self._left(host))
            try:
                request = client.build_request(method, url, timeout=timeout,
                                               **{**kwargs, "headers": headers})
                response = client.send(request, stream=True)
                if response.is_redirect and method == "GET" and "/blobs/" in url:
                    response = self._follow(host, response)
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:  # (a bad URL too)
                problem = f"{host}: {type(e).__name__}: {str(e)[:200]}"
            else:
                if response.status_code == 401 and not tried_auth:
                    tried_auth = True
                    challenge = response.headers.get("www-authenticate", "")
                    response.close()
                    if self._authenticate(host, scope, challenge):
                        continue
                    raise _SourceFailed(f"{host}: 401, and no credentials it accepts")
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"{host}: {response.status_code}"
                response.close()
            attempt += 1
            if attempt >= self.config.attempts or self.deadline - time.monotonic() < delay:
                raise _SourceFailed(problem)
            time.sleep(delay)
            delay *= 2

    def _follow(self, host: str, response: httpx.Response) -> httpx.Response:
        """Follow up to three redirects of a GET, sending no credentials (https only, unless
        ``host`` is an insecure registry)."""
        import httpx

        for _ in range(3):
            target = str(response.url.join(response.headers.get("location", "")))
            response.close()
            if not (target.startswith("https://") or host in self.config.insecure):
                raise _SourceFailed(f"{host}: redirected to plain HTTP: refused")
            if not self._may_visit(host, target):
                raise _SourceFailed(f"{host}: redirected to a host that is neither it nor one "
                                    "of registry_auxiliary_hosts: refused")
            if self._plain is None:
                self._plain = httpx.Client(transport=self._transport(),
                                           timeout=self.config.timeout_s, trust_env=False,
                                           follow_redirects=False)
            response = self._plain.send(self._plain.build_request(
                "GET", target, timeout=min(self.config.timeout_s, self._left(host))), stream=True)
            if not response.is_redirect:
                return response
        response.close()
        raise _SourceFailed(f"{host}: too many redirects")

    def _authorization(self, host: str, scope: str) -> str | None:
        token = self._tokens.get((host, scope))
        if token:
            return f"Bearer {token}"
        return self._tokens.get((host, "basic"))

    def _authenticate(self, host: str, scope: str, challenge: str) -> bool:
        """Answer a 401's challenge: basic with the operator's credentials for ``host``, or
        a bearer token fetched from the realm the registry names (with those credentials)."""
        import base64

        credentials = self.config.credentials.get(host)
        basic = None
        if credentials:
            basic = "Basic " + base64.b64encode(
                f"{credentials[0]}:{credentials[1]}".encode()).decode()
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            if basic is None:
                return False
            self._tokens[(host, "basic")] = basic
            return True
        if kind.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        token = self._bearer(host, fields, scope, basic)
        if token is None:
            return False
        self._tokens[(host, scope)] = token
        return True

    def _may_visit(self, host: str, url: str) -> bool:
        """Whether the registry ``host`` may send the runner to ``url``: its own host, or
        one of the operator's auxiliary hosts."""
        from urllib.parse import urlsplit

        try:
            netloc = urlsplit(url).netloc
        except ValueError:
            return False
        return bool(netloc) and (netloc == host or netloc in self.config.auxiliary_hosts)

    def _bearer(self, host: str, fields: dict[str, str], scope: str,
                basic: str | None) -> str | None:
        import httpx

        realm = fields.get("realm", "")
        secure = realm.startswith("https://")
        if not (secure or (realm.startswith("http://") and host in self.config.insecure)):
            return None  # credentials never travel in the clear to a realm we did not allow
        if not self._may_visit(host, realm):
            return None  # nor to a host the operator did not name
        params = {"scope": scope, **({"service": fields["service"]} if "service" in fields
                                     else {})}
        try:
            with httpx.Client(transport=self._transport(), trust_env=False,
                              follow_redirects=False) as client, client.stream(
                    "GET", realm, params=params, headers={"Authorization": basic}
                    if basic else {}, timeout=min(self.config.timeout_s, self._left(host))
                    ) as answer:
                if answer.status_code != 200:
                    return None
                body = bytearray()
                for chunk in answer.iter_bytes():
                    body += chunk
                    if len(body) > 65536:
                        return None
                    self._left(host)
            doc = json.loads(bytes(body))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, RecursionError, _SourceFailed):
            self._left(host)  # out of time: that, not "no credentials it accepts"
            return None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        return token if isinstance(token, str) and 0 < len(token) < 16384 else None


class _SourceFailed(ImageUnavailable):
    """A source did not answer usefully (unreachable, 5xx, refused credentials, too slow)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem, hint=_hint(problem))


def _hint(problems: str) -> str:
    """What to check, for what sources said (or did not)."""
    if "WRONG_VERSION_NUMBER" in problems or "record layer failure" in problems:
        return ("the registry seems to speak plain HTTP: if it should (a registry on loopback "
                "for tests), list it in insecure_registries (STOCKADE_INSECURE_REGISTRIES)")
    if "CERTIFICATE_VERIFY_FAILED" in problems:
        return "give the CA of the registry's certificate in registry_ca_file"
    if re.search(r": 401\b", problems):  # (the status, not a port: "host:4011")
        return "check the registry's credentials in registry_auth_file"
    if "ConnectError" in problems or "ConnectTimeout" in problems or "out of time" in problems:
        return "is the registry running and reachable from this host? (check REGISTRY:PORT)"
    if "has no tag" in problems or "has no manifest" in problems:
        return "check the repository and the tag or digest (stockade image push prints them)"
    return ""


class _Answer:
    """A streamed response as a context manager (closed at the end)."""

    def __init__(self, registry: Registry, host: str, method: str, url: str, repository: str,
                 push: bool, kwargs: dict[str, Any]) -> None:
        self.args = (host, method, url, repository, push, kwargs)
        self.registry = registry
        self.response: httpx.Response | None = None

    def __enter__(self) -> httpx.Response:
        self.response = self.registry._send(*self.args)
        return self.response

    def __exit__(self, *exc: object) -> None:
        if self.response is not None:
            self.response.close()


def _same_origin(base: str, url: str) -> bool:
    """Whether ``url`` (a path, or an absolute URL a registry named) is on ``base``'s origin:
    an upload location elsewhere would get our credentials."""
    if url.startswith("/"):
        return True
    return url.split("/")[:3] == base.rstrip("/").split("/")[:3]


def _check_status(response: httpx.Response, source: str, ok: tuple[int, ...] = (200,)) -> None:
    if response.status_code not in ok:
        raise _SourceFailed(f"{source}: {response.status_code}")


def _read_bounded(chunks: Iterator[bytes], limit: int, what: str) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise ImageRefused(f"{what} is larger than {limit} bytes")
    return bytes(data)


def _copy_checked(chunks: Iterator[bytes], out: BinaryIO, d: Descriptor) -> None:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        size += len(chunk)
        if size > d.size:
            raise ImageRefused(f"blob {d.digest} is larger than its {d.size} bytes")
        digest.update(chunk)
        out.write(chunk)
    got = "sha256:" + digest.hexdigest()
    if size != d.size or got != d.digest:
        raise ImageRefused(f"blob {d.digest} came with sha256 {got} ({size} bytes): refused")


def _json(raw: bytes, digest: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ImageRefused(f"manifest {digest} is not JSON") from None
    if not isinstance(doc, dict):
        raise ImageRefused(f"manifest {digest} is not a JSON object")
    return doc


def _pick(index: dict[str, Any], platform: tuple[str, str], digest: str) -> str:
    """The digest of ``platform``'s manifest in an image index."""
    for entry in index.get("manifests") or ():
        p = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(p, dict) and (p.get("os"), p.get("architecture")) == platform:
            d = Descriptor.of(entry, MAX_MANIFEST_BYTES)
            return d.digest
    raise ImageUnavailable(f"index {digest} has no {platform[0]}/{platform[1]} image")
