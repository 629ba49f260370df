"""cosign-compatible keyed image signatures, offline (no transparency log, no certificates).

What cosign writes and reads, and so what this module writes and reads: for the image
``REGISTRY/REPO@sha256:HEX``, the manifest tagged ``sha256-HEX.sig`` in the same repository
(an OCI image manifest; a docker one is read too) holds one layer per signature. Each layer
is a *simple signing* payload (media type :data:`SIMPLE_SIGNING`)::

    {"critical":{"identity":{"docker-reference":"REGISTRY/REPO"},
                 "image":{"docker-manifest-digest":"sha256:HEX"},
                 "type":"cosign container image signature"},"optional":null}

(one line, these bytes exactly: Go's ``json.Marshal``), with the annotation
:data:`SIGNATURE_ANNOTATION`: base64 of an ASN.1 DER ECDSA P-256 signature over the payload
bytes (SHA-256). The config is the empty image's with one ``diff_ids`` and ``history`` entry
per layer, as go-containerregistry writes it. Signing appends a layer (a signature already
there by the same key over the same payload is kept instead); verifying accepts the image when
any one layer is signed by a trusted key and its payload names this very digest and this
repository. A registry (or a mirror) chooses every byte read here: every size is bounded, each
payload is fetched by its digest and checked against it, and payloads are parsed strictly
(unknown or duplicate fields refused) only after their signature is verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from stockade.image.cosign_keys import PublicKey, public_key
from stockade.image.errors import ImageRefused
from stockade.image.reference import BadReference, ImageRef, parse_reference
from stockade.image.registry import (
    DOCKER_MANIFEST,
    MANIFESTS,
    MAX_MANIFEST_BYTES,
    OCI_MANIFEST,
    Descriptor,
    Registry,
)

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
CONFIG_TYPES = {OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
                DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json"}
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_SIGNATURES = 256  # layers of one signature manifest (cosign stops at 1000)
MAX_SIGNATURE_CHARS = 1024  # base64 (a P-256 signature is at most 96)
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time, in every config cosign writes
# the most telling refusal first, when no signature is accepted
_PRECEDENCE = ("other-digest", "other-repository", "bad-payload", "untrusted", "malformed")


class SignatureRefused(ImageRefused):
    """The image has no signature that a trusted key made over this digest in this
    repository; ``problem`` says why in one word (``unsigned``, ``untrusted``,
    ``other-digest``, ``other-repository``, ``bad-payload``, ``malformed``)."""

    exit_code = 1

    def __init__(self, problem: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.problem = problem


class Claim(NamedTuple):
    """What a payload says was signed."""

    registry: str
    repository: str
    digest: str


class Verified(NamedTuple):
    """An accepted signature: by ``key``, in layer ``payload_digest`` of ``signatures``."""

    key: PublicKey
    payload_digest: str
    signatures: int


class Signed(NamedTuple):
    """What signing did: the tag written (``pushed``) or already holding this signature."""

    tag: str
    signatures: int
    pushed: bool


class _SigManifest(NamedTuple):
    media_type: str
    config_media_type: str
    layers: list[dict[str, Any]]  # as the registry sent them


def signature_tag(digest: str) -> str:
    """The tag cosign keeps the signatures of manifest ``digest`` under."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}-{hex_digest}.sig"


def payload_for(ref: ImageRef) -> bytes:
    """The simple signing payload of pinned ``ref``, byte for byte as cosign makes it."""
    if not ref.digest:
        raise ValueError("sign a pinned reference")
    doc = {"critical": {"identity": {"docker-reference": f"{ref.registry}/{ref.repository}"},
                        "image": {"docker-manifest-digest": ref.digest},
                        "type": PAYLOAD_TYPE},
           "optional": None}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_payload(raw: bytes) -> Claim:
    """What payload ``raw`` claims (SignatureRefused ``bad-payload`` unless it is exactly a
    simple signing payload: no field missing, unknown or twice; ``optional`` null or an
    object)."""
    try:
        doc: Any = json.loads(raw.decode(), object_pairs_hook=_no_duplicates) \
            if len(raw) <= MAX_PAYLOAD_BYTES else {}
        critical = doc["critical"]
        reference = critical["identity"]["docker-reference"]
        digest = critical["image"]["docker-manifest-digest"]
        exact = (set(doc) == {"critical", "optional"}
                 and set(critical) == {"identity", "image", "type"}
                 and set(critical["identity"]) == {"docker-reference"}
                 and set(critical["image"]) == {"docker-manifest-digest"}
                 and critical["type"] == PAYLOAD_TYPE
                 and (doc["optional"] is None or isinstance(doc["optional"], dict))
                 and isinstance(reference, str) and isinstance(digest, str))
        named = parse_reference(f"{reference}@{digest}") if exact else None
    except (ValueError, RecursionError, KeyError, TypeError, BadReference):
        named = None
    if named is None or named.digest is None or named.tag is not None:
        raise SignatureRefused("bad-payload", "a signed payload is not a cosign simple "
                                              "signing payload")
    return Claim(named.registry, named.repository, named.digest)


def verify_image(registry: Registry, ref: ImageRef, keys: tuple[PublicKey, ...]) -> Verified:
    """The signature of pinned ``ref`` that one of ``keys`` made (SignatureRefused saying
    why there is none; ImageUnavailable if the registry and its mirrors cannot tell)."""
    if not ref.digest or not keys:
        raise ValueError("verify a pinned reference against at least one key")
    name, tag = f"{ref.registry}/{ref.repository}", signature_tag(ref.digest)
    found = registry.find_manifest(ref, tag)
    if found is None:
        raise SignatureRefused("unsigned", f"{name}@{ref.digest} is not signed: {name} has no "
                                           f"tag {tag}",
                               hint="sign it with: stockade image sign (or cosign sign) --key")
    layers = [layer for layer in _read_manifest(found, tag).layers
              if layer.get("mediaType") == SIMPLE_SIGNING]
    refusals: list[SignatureRefused] = []
    for layer in layers:
        try:
            key, digest = _check_layer(registry, ref, layer, keys)
        except SignatureRefused as e:
            refusals.append(e)
            continue
        return Verified(key, digest, len(layers))
    if not refusals:
        raise SignatureRefused("unsigned", f"{name}@{ref.digest} is not signed: {tag} holds "
                                           "no cosign signature")
    refusals.sort(key=lambda e: _PRECEDENCE.index(e.problem))
    raise _refusal(refusals[0], ref, len(layers), keys)


def sign_image(registry: Registry, ref: ImageRef, key: ec.EllipticCurvePrivateKey) -> Signed:
    """Sign pinned ``ref`` with ``key``: its payload pushed and a layer appended to the
    signature manifest (made if there is none), unless that manifest already holds a
    signature by this key over this payload."""
    payload, tag = payload_for(ref), signature_tag(str(ref.digest))
    payload_digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    found = registry.find_manifest(ref, tag)
    manifest = _read_manifest(found, tag) if found is not None else _SigManifest(
        OCI_MANIFEST, CONFIG_TYPES[OCI_MANIFEST], [])
    mine = public_key(key.public_key(), "the signing key")
    for layer in manifest.layers:
        if layer.get("digest") == payload_digest and mine.verifies(
                _signature(layer) or b"", payload):
            return Signed(tag, len(manifest.layers), pushed=False)
    if len(manifest.layers) >= MAX_SIGNATURES:
        raise ImageRefused(f"{tag} already holds {len(manifest.layers)} signatures: no more "
                           "are added")
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    layers = [*manifest.layers, {
        "mediaType": SIMPLE_SIGNING, "size": len(payload), "digest": payload_digest,
        "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}}]
    config = _config(layers)
    registry.push_bytes(ref, payload)
    doc = {"schemaVersion": 2, "mediaType": manifest.media_type,
           "config": {"mediaType": manifest.config_media_type, "size": len(config),
                      "digest": registry.push_bytes(ref, config)},
           "layers": layers}
    registry.push_manifest(ref, tag, manifest.media_type,
                           json.dumps(doc, separators=(",", ":")).encode())
    return Signed(tag, len(layers), pushed=True)


def _check_layer(registry: Registry, ref: ImageRef, layer: dict[str, Any],
                 keys: tuple[PublicKey, ...]) -> tuple[PublicKey, str]:
    """The key that signed this layer's payload for ``ref``, and the payload's digest."""
    try:
        descriptor = Descriptor.of(layer, MAX_PAYLOAD_BYTES)
    except ImageRefused:
        raise SignatureRefused("malformed", "a signature layer is malformed") from None
    signature = _signature(layer)
    if signature is None:
        raise SignatureRefused("malformed", "a signature layer has no well-formed signature")
    payload = io.BytesIO()
    registry.blob(ref, descriptor, payload)  # (its size and sha256 checked)
    return check_signature(payload.getvalue(), signature, ref, keys), descriptor.digest


def check_signature(payload: bytes, signature: bytes, ref: ImageRef,
                    keys: tuple[PublicKey, ...]) -> PublicKey:
    """The one of ``keys`` whose ``signature`` (DER) over ``payload`` this is, ``payload``
    naming pinned ``ref`` (SignatureRefused otherwise: ``untrusted``, ``bad-payload``,
    ``other-digest``, ``other-repository``)."""
    key = next((k for k in keys if k.verifies(signature, payload)), None)
    if key is None:
        raise SignatureRefused("untrusted", "not signed by a trusted key")
    claim = parse_payload(payload)
    if claim.digest != ref.digest:
        raise SignatureRefused("other-digest", f"the signature by {key.describe()} is for "
                                               f"{claim.digest}, not {ref.digest}")
    if (_registry_name(claim.registry), claim.repository) != (
            _registry_name(ref.registry), ref.repository):
        raise SignatureRefused("other-repository", f"the signature by {key.describe()} is for "
                               f"{claim.registry}/{claim.repository}, not "
                               f"{ref.registry}/{ref.repository}")
    return key


def _refusal(first: SignatureRefused, ref: ImageRef, count: int,
             keys: tuple[PublicKey, ...]) -> SignatureRefused:
    """What to say when no layer passed, ``first`` being the most telling problem."""
    name = f"{ref.registry}/{ref.repository}@{ref.digest}"
    plural = "" if count == 1 else "s"
    if first.problem == "untrusted":
        trusted = ", ".join(k.describe() for k in keys)
        return SignatureRefused(first.problem, f"{name}: {count} signature{plural}, none by "
                                f"a trusted key (trusted: {trusted})",
                                hint="sign it with a trusted key, or trust its signer's key")
    if first.problem == "malformed":
        return SignatureRefused(first.problem, f"{name}: {count} signature{plural}, none "
                                f"well-formed ({first.message})")
    return SignatureRefused(first.problem, f"{name}: {first.message}: refused (a signature "
                            "is valid only for the digest and repository it names)")


def _read_manifest(found: tuple[str, bytes, str], tag: str) -> _SigManifest:
    """The signature manifest the registry sent (SignatureRefused if it is not one)."""
    media_type, raw, _ = found
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
        layers, config_type = doc["layers"], doc["config"]["mediaType"]
        well_formed = (doc.get("schemaVersion") == 2 and media_type in MANIFESTS
                       and isinstance(layers, list) and len(layers) <= MAX_SIGNATURES
                       and all(isinstance(layer, dict) for layer in layers)
                       and isinstance(config_type, str) and len(config_type) < 256)
    except (ValueError, RecursionError, KeyError, TypeError):
        well_formed = False
    if not well_formed or len(raw) > MAX_MANIFEST_BYTES:
        raise SignatureRefused("malformed", f"{tag} is not a signature manifest (at most "
                                            f"{MAX_SIGNATURES} layers)")
    return _SigManifest(media_type, config_type, layers)


def _signature(layer: dict[str, Any]) -> bytes | None:
    """The layer's signature (DER), or None if its annotation is missing or malformed."""
    annotations = layer.get("annotations")
    text = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(text, str) or not 0 < len(text) <= MAX_SIGNATURE_CHARS:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return None


def _config(layers: list[dict[str, Any]]) -> bytes:
    """The signature image's config as go-containerregistry writes it for an empty image
    with these layers appended (a layer's DiffID is its digest: payloads are uncompressed)."""
    diff_ids = [Descriptor.of(layer, MAX_MANIFEST_BYTES).digest for layer in layers]
    doc = {"architecture": "", "created": _ZERO_TIME,
           "history": [{"created": _ZERO_TIME} for _ in layers], "os": "",
           "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}}
    return json.dumps(doc, separators=(",", ":")).encode()


def _registry_name(host: str) -> str:
    """Registry hosts compare without case; ``docker.io`` is cosign's ``index.docker.io``."""
    host = host.lower()
    return "index.docker.io" if host == "docker.io" else host


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a field appears twice")
    return doc
