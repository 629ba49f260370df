"""cosign-compatible signatures without a registry: a real cosign signature accepted and
refused when anything about it changes, payloads parsed strictly, cosign's encrypted key
format read as go-securesystemslib writes it (its own test vectors) and round-tripped, and the
operator's trust policy (the most specific prefix decides)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from stockade.config import Settings, load_settings
from stockade.errors import ConfigError
from stockade.image.cosign_keys import (
    KeyFileError,
    decrypt,
    generate_key_pair,
    load_private_key,
    load_public_key,
    public_key,
    public_pem,
)
from stockade.image.reference import parse_reference
from stockade.image.signing import (
    SignatureRefused,
    check_signature,
    parse_payload,
    payload_for,
    signature_tag,
)
from stockade.image.trust import trust_policy

REAL = Path(__file__).parents[2] / "fixtures" / "cosign-real"
DIGEST = "sha256:7396780b5862cf8b37527854a2a2331e5c746b6a71aa1f424258c3bfaf3a1bd7"
REPOSITORY = "ghcr.io/freedomofpress/dangerzone/v1"
REF = parse_reference(f"{REPOSITORY}@{DIGEST}")
OTHER_DIGEST = "sha256:" + "1" * 64


def _real() -> tuple[bytes, bytes, tuple]:  # type: ignore[type-arg]
    payload = (REAL / "payload.json").read_bytes()
    signature = base64.b64decode((REAL / "signature.b64").read_text().strip(), validate=True)
    key = load_public_key((REAL / "cosign.pub").read_bytes(), "cosign.pub")
    return payload, signature, (key,)


def _problem(payload: bytes, signature: bytes, ref: object, keys: tuple) -> str:  # type: ignore[type-arg]
    with pytest.raises(SignatureRefused) as refused:
        check_signature(payload, signature, ref, keys)  # type: ignore[arg-type]
    return refused.value.problem


# -- the real cosign signature ----------------------------------------------------------------

def test_a_real_cosign_signature_is_accepted_and_our_payload_is_its_bytes() -> None:
    payload, signature, keys = _real()
    assert check_signature(payload, signature, REF, keys) is keys[0]
    assert payload_for(REF) == payload  # byte for byte what cosign signed
    assert hashlib.sha256(payload).hexdigest() == \
        "88b8a2ac5b829f47bd25a5a4d9c2ccb0fccff7f53a17477b6d9b5680436aa80f"
    assert signature_tag(DIGEST) == f"sha256-{DIGEST[7:]}.sig"


def test_the_real_signature_is_refused_when_one_payload_byte_changes() -> None:
    payload, signature, keys = _real()
    for at in range(len(payload)):
        changed = bytearray(payload)
        changed[at] ^= 0x01
        assert _problem(bytes(changed), signature, REF, keys) == "untrusted", at


def test_the_real_signature_is_refused_for_another_digest_repository_or_key() -> None:
    payload, signature, keys = _real()
    assert _problem(payload, signature, REF.with_digest(OTHER_DIGEST), keys) == "other-digest"
    moved = REF._replace(repository="freedomofpress/dangerzone/v2")
    assert _problem(payload, signature, moved, keys) == "other-repository"
    assert _problem(payload, signature, REF._replace(registry="ghcr.example"),
                    keys) == "other-repository"
    other = public_key(ec.generate_private_key(ec.SECP256R1()).public_key(), "other.pub")
    assert _problem(payload, signature, REF, (other,)) == "untrusted"
    assert check_signature(payload, signature, REF, (other, *keys)) is keys[0]  # any one
    assert _problem(payload, signature[:-1], REF, keys) == "untrusted"


def test_a_payload_naming_another_digest_is_refused_even_signed_by_a_trusted_key() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    keys = (public_key(private.public_key(), "team.pub"),)
    for ref, problem in ((REF.with_digest(OTHER_DIGEST), "other-digest"),
                         (REF._replace(repository="someone/else"), "other-repository")):
        payload = payload_for(ref)
        signature = private.sign(payload, ec.ECDSA(hashes.SHA256()))
        assert check_signature(payload, signature, ref, keys) is keys[0]
        assert _problem(payload, signature, REF, keys) == problem


def _doc(**changes: object) -> bytes:
    doc: dict = json.loads(payload_for(REF))  # type: ignore[type-arg]
    for path, value in changes.items():
        *parents, last = path.split("__")
        where = doc
        for key in parents:
            where = where[key.replace("_", "-")]
        if value is KeyError:
            del where[last.replace("_", "-")]
        else:
            where[last.replace("_", "-")] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw", [
    _doc(critical__type="atomic container signature"),
    _doc(critical__image__docker_manifest_digest="sha512:" + "a" * 128),
    _doc(critical__image__docker_manifest_digest=DIGEST.upper()),
    _doc(critical__identity__docker_reference="ghcr.io/freedomofpress/dangerzone/v1:latest"),
    _doc(critical__identity__docker_reference="dangerzone"),
    _doc(critical__identity__docker_reference=["ghcr.io/x"]),
    _doc(critical__identity__extra="x"),
    _doc(critical__extra={}),
    _doc(extra=1),
    _doc(optional=KeyError),
    _doc(optional=["a"]),
    _doc(critical__image=KeyError),
    payload_for(REF)[:-1],
    payload_for(REF).replace(b'"optional":null', b'"optional":null,"optional":{}'),
    payload_for(REF).replace(b'"type"', b'"type":"x","type"'),
    b"\xff" + payload_for(REF),
    b"[]", b"null", b"",
    payload_for(REF)[:-1] + b',"optional2":"' + b"x" * 70_000 + b'"}',
])
def test_payloads_are_parsed_strictly(raw: bytes) -> None:
    with pytest.raises(SignatureRefused) as refused:
        parse_payload(raw)
    assert refused.value.problem == "bad-payload"


def test_a_payload_with_annotations_is_accepted() -> None:
    raw = payload_for(REF).replace(b'"optional":null', b'"optional":{"by":"ci","n":1}')
    claim = parse_payload(raw)
    assert (claim.registry, claim.repository, claim.digest) == (
        "ghcr.io", "freedomofpress/dangerzone/v1", DIGEST)


# -- cosign's key files -----------------------------------------------------------------------

# go-securesystemslib's own test vectors (encrypted/encrypted_test.go): what its Go Encrypt
# wrote, with the passphrase "supersecret"; the first seals b"reallyimportant", the others
# (Marshal) its JSON string
GO_VECTORS = [
    (b'{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"N9a7x5JFGbrtB2uBR81jPw'
     b'p0eiLR4A7FV3mjVAQrg1g="},"cipher":{"name":"nacl/secretbox","nonce":"2h8HxMmgRfuYdpswZBQa'
     b'U3xJ1nkA/5Ik"},"ciphertext":"SEW6sUh0jf2wfdjJGPNS9+bkk2uB+Cxamf32zR8XkQ=="}',
     b"reallyimportant"),
    (b'{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":"FhzPOt9/bJG4PTq6lQ6ecG'
     b'6GzaOuOy/ynG5+yRiFlNs="},"cipher":{"name":"nacl/secretbox","nonce":"aw1ng1jHaDz/tQ7V2gR9'
     b'O2+IGQ8xJEuE"},"ciphertext":"HycvuLZL4sYH0BrYTh4E/H20VtAW6u5zL5Pr+IBjYLYnCPzDkq8="}',
     b'"cmVhbGx5aW1wb3J0YW50"'),
]


@pytest.mark.parametrize(("document", "plaintext"), GO_VECTORS)
def test_what_go_securesystemslib_encrypted_is_decrypted(document: bytes,
                                                          plaintext: bytes) -> None:
    assert decrypt(document, b"supersecret") == plaintext
    with pytest.raises(KeyFileError, match="wrong password"):
        decrypt(document, b"supersecreT")


@pytest.mark.parametrize("change", [
    lambda d: d.replace(b'"N":32768', b'"N":99'),  # its own "unsupported parameters" case
    lambda d: d.replace(b'"N":32768', b'"N":1048576'),  # a memory bomb
    lambda d: d.replace(b'"N":32768', b'"N":32768.0'),
    lambda d: d.replace(b'"r":8', b'"r":true'),
    lambda d: d.replace(b'"scrypt"', b'"argon2"'),
    lambda d: d.replace(b'"nacl/secretbox"', b'"aes-gcm"'),
    lambda d: d.replace(b'"nonce":"2h8H', b'"nonce":"2h8HAAAA'),
    lambda d: d.replace(b'"ciphertext"', b'"ciphertext":"","ciphertext"'),
    lambda d: d.replace(b'"ciphertext":"SEW6', b'"ciphertext":"!EW6'),
    lambda d: d[:-1] + b',"extra":1}',
    lambda d: b"[]",
])
def test_a_malformed_or_hostile_key_document_is_refused_before_scrypt(change) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyFileError) as refused:
        decrypt(change(GO_VECTORS[0][0]), b"supersecret")
    assert "wrong password" not in refused.value.message


def _go_key_file(key: ec.EllipticCurvePrivateKey, password: bytes, kind: str) -> bytes:
    """A cosign key file made here by following the Go code step by step (scrypt, then
    secretbox.Seal, then json.Marshal of the structs, then pem.EncodeToMemory), independently
    of stockade's encoder."""
    import nacl.bindings

    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, nonce = bytes(range(32)), bytes(range(100, 124))
    box_key = hashlib.scrypt(password, salt=salt, n=32768, r=8, p=1, dklen=32, maxmem=1 << 26)
    sealed = nacl.bindings.crypto_secretbox(der, nonce, box_key)  # tag || ciphertext
    salt64, nonce64, sealed64 = (base64.b64encode(b).decode() for b in (salt, nonce, sealed))
    body = ('{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"' + salt64
            + '"},"cipher":{"name":"nacl/secretbox","nonce":"' + nonce64
            + '"},"ciphertext":"' + sealed64 + '"}').encode()
    text = base64.b64encode(body).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode()


@pytest.mark.parametrize("kind", ["ENCRYPTED SIGSTORE PRIVATE KEY",
                                  "ENCRYPTED COSIGN PRIVATE KEY"])
def test_a_key_file_made_the_go_way_is_loaded(kind: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    loaded = load_private_key(_go_key_file(key, b"pw", kind), b"pw", "cosign.key")
    assert loaded.private_numbers() == key.private_numbers()
    with pytest.raises(KeyFileError, match="wrong password"):
        load_private_key(_go_key_file(key, b"pw", kind), b"", "cosign.key")


def test_a_generated_key_pair_round_trips_in_cosign_s_format(tmp_path: Path) -> None:
    private, public = generate_key_pair(tmp_path / "team", b"s3cret")
    assert (private.name, public.name) == ("team.key", "team.pub")
    assert private.stat().st_mode & 0o777 == 0o600
    text = private.read_text()
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"
    assert lines[-1] == "-----END ENCRYPTED SIGSTORE PRIVATE KEY-----"
    assert all(len(line) == 64 for line in lines[1:-2]) and 0 < len(lines[-2]) <= 64
    body = base64.b64decode("".join(lines[1:-1]))
    # the JSON go-securesystemslib's Encrypt writes: its fields, in its order, on one line
    assert re.fullmatch(
        rb'\{"kdf":\{"name":"scrypt","params":\{"N":65536,"r":8,"p":1\},'
        rb'"salt":"[A-Za-z0-9+/]{43}="\},"cipher":\{"name":"nacl/secretbox",'
        rb'"nonce":"[A-Za-z0-9+/]{32}"\},"ciphertext":"[A-Za-z0-9+/=]+"\}', body), body
    key = load_private_key(private.read_bytes(), b"s3cret", str(private))
    pub = load_public_key(public.read_bytes(), str(public))
    assert public.read_bytes() == public_pem(key.public_key())
    assert pub.fingerprint == public_key(key.public_key(), "x").fingerprint
    payload = payload_for(REF)
    assert pub.verifies(key.sign(payload, ec.ECDSA(hashes.SHA256())), payload)
    with pytest.raises(KeyFileError, match="wrong password"):
        load_private_key(private.read_bytes(), b"s3cret ", str(private))
    with pytest.raises(KeyFileError, match="exists"):
        generate_key_pair(tmp_path / "team", b"other")
    assert load_private_key(private.read_bytes(), b"s3cret", "k").private_numbers() == \
        key.private_numbers()  # (not overwritten)


def test_keys_of_another_kind_are_refused(tmp_path: Path) -> None:
    plain = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(KeyFileError, match="not a cosign private key"):
        load_private_key(plain, b"", "plain.pem")
    with pytest.raises(KeyFileError, match="not a PEM key file"):
        load_private_key(b"hello", b"", "junk")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(KeyFileError, match="ECDSA P-256 private"):
        load_private_key(_go_key_file(p384, b"", "ENCRYPTED SIGSTORE PRIVATE KEY"), b"", "k")
    for other in (p384.public_key(), ed25519.Ed25519PrivateKey.generate().public_key()):
        pem = other.public_bytes(serialization.Encoding.PEM,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(KeyFileError, match="not an ECDSA P-256 public key"):
            load_public_key(pem, "other.pub")
    with pytest.raises(KeyFileError, match="not an ECDSA P-256 public key"):
        load_public_key(plain, "private-as-public.pem")


# -- the operator's trust policy --------------------------------------------------------------

def _pub(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.pub"
    path.write_bytes(public_pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    return str(path)


def test_the_most_specific_prefix_decides(tmp_path: Path) -> None:
    org, reg, team, team2 = (_pub(tmp_path, n) for n in ("org", "reg", "team", "team2"))
    policy = trust_policy(Settings(home=tmp_path, image_trusted_keys=(
        f"*={org}", f"Registry.Example:5000={reg}", f"registry.example:5000/team={team}",
        f"registry.example:5000/team={team2}")))

    def keys(image: str) -> tuple[str, list[str]] | None:
        rule = policy.rule_for(parse_reference(image))
        return None if rule is None else (rule.prefix, [k.source for k in rule.keys])

    assert keys("registry.example:5000/team/app:1") == ("registry.example:5000/team",
                                                        [team, team2])
    assert keys("registry.example:5000/team:1") == ("registry.example:5000/team", [team, team2])
    assert keys("registry.example:5000/teams/app:1") == ("registry.example:5000", [reg])
    assert keys("REGISTRY.example:5000/other:1") == ("registry.example:5000", [reg])
    assert keys("registry.example/team/app:1") == ("*", [org])
    assert not policy.require_signed
    narrow = trust_policy(Settings(home=tmp_path, image_trusted_keys=(f"reg.example/a/b={team}",),
                                   require_signed_images=True))
    assert narrow.rule_for(parse_reference("reg.example/a/bc:1")) is None
    assert narrow.rule_for(parse_reference("reg.example/a/b/c:1")) is not None
    assert narrow.require_signed


@pytest.mark.parametrize("entry", ["registry.example", "=x.pub", "registry.example/=x.pub",
                                   "https://registry.example=x.pub", "reg.example/A=x.pub",
                                   "reg.example/a:1=x.pub", "**=x.pub"])
def test_a_malformed_trust_entry_is_refused(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError, match="image_trusted_keys"):
        trust_policy(Settings(home=tmp_path, image_trusted_keys=(entry,)))


def test_an_unusable_trusted_key_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("not a key")
    for path in (tmp_path / "missing.pub", tmp_path / "junk.pub"):
        with pytest.raises(ConfigError, match="image_trusted_keys"):
            trust_policy(Settings(home=tmp_path, image_trusted_keys=(f"*={path}",)))


def test_the_settings_come_from_the_environment(tmp_path: Path) -> None:
    env = {"STOCKADE_HOME": str(tmp_path),
           "STOCKADE_IMAGE_TRUSTED_KEYS": "a.example=/k.pub, *=/o.pub",
           "STOCKADE_REQUIRE_SIGNED_IMAGES": "true"}
    settings = load_settings(env)
    assert settings.image_trusted_keys == ("a.example=/k.pub", "*=/o.pub")
    assert settings.require_signed_images is True
    assert load_settings({**env, "STOCKADE_REQUIRE_SIGNED_IMAGES": "off"}
                         ).require_signed_images is False
    assert load_settings({"STOCKADE_HOME": str(tmp_path)}).require_signed_images is False
    with pytest.raises(ConfigError, match="require_signed_images"):
        load_settings({**env, "STOCKADE_REQUIRE_SIGNED_IMAGES": "maybe"})


def test_the_verdict_on_images_no_key_covers_and_on_image_host(tmp_path: Path) -> None:
    from stockade.image.registry import Registry, RegistryConfig
    from stockade.image.trust import TrustPolicy, host_verdict, signature_verdict

    offline = Registry(RegistryConfig())  # (never asked: no key covers the image)
    assert signature_verdict(TrustPolicy(), offline, REF) == (None, None, None)
    covered_elsewhere = trust_policy(Settings(home=tmp_path, image_trusted_keys=(
        f"registry.example={_pub(tmp_path, 'k')}",)))
    assert "not checked" in str(signature_verdict(covered_elsewhere, offline, REF).note)
    refused = signature_verdict(covered_elsewhere._replace(require_signed=True), offline, REF)
    assert refused.refusal is not None and "require_signed_images" in refused.refusal
    assert refused.event is not None and refused.event[0] == "image.unverified"
    assert refused.event[1]["problem"] == "no-trusted-key"
    assert host_verdict(Settings(home=tmp_path)) == (None, None, None)
    host = host_verdict(Settings(home=tmp_path, require_signed_images=True))
    assert host.refusal is not None and "image: host has no signature" in host.refusal
