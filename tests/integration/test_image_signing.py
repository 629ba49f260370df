"""cosign-compatible image signatures against a real registry on loopback: ``stockade image
sign|verify|generate-key-pair`` as a user runs them (what lands in the registry is what cosign
writes), and jobs that run only on images a trusted key signed for that digest in that
repository, failing ``image_unverified`` before any step otherwise, with the reason audited."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from stockade.image.cosign_keys import public_pem
from stockade.image.reference import ImageRef, parse_reference
from stockade.image.registry import Descriptor, Registry, RegistryConfig
from stockade.image.signing import (
    SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING,
    payload_for,
    sign_image,
    signature_tag,
)
from tests.conftest import run_cli
from tests.support.images import Image, busybox_image
from tests.support.registry import RunningRegistry

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _blob(client: Registry, ref: ImageRef, descriptor: dict) -> bytes:  # type: ignore[type-arg]
    out = io.BytesIO()
    client.blob(ref, Descriptor.of(descriptor, 1 << 20), out)
    return out.getvalue()


def _signatures(client: Registry, ref: ImageRef) -> dict:  # type: ignore[type-arg]
    found = client.find_manifest(ref, signature_tag(str(ref.digest)))
    assert found is not None
    return dict(json.loads(found[1]))


def test_sign_and_verify_with_the_cli(registry: RunningRegistry, tmp_path: Path) -> None:
    assert registry.credentials is not None and registry.ca_file is not None
    client = Registry(RegistryConfig(credentials={registry.host: registry.credentials},
                                     ca_file=registry.ca_file))
    image = Image(tmp_path, "to be signed")
    image.push(client, f"{registry.host}/signing/app:1")
    ref = parse_reference(f"{registry.host}/signing/app@{image.digest}")
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {registry.host: {"auth": base64.b64encode(
        ":".join(registry.credentials).encode()).decode()}}}))
    auth.chmod(0o600)
    env = {"STOCKADE_REGISTRY_AUTH_FILE": str(auth), "STOCKADE_REGISTRY_CA_FILE": registry.ca_file,
           "COSIGN_PASSWORD": "correct horse"}
    home, team, other = tmp_path / "home", tmp_path / "team", tmp_path / "other"

    def cli(*args: str, **more: str):  # type: ignore[no-untyped-def]
        return run_cli(home, "image", *args, **{**env, **more})

    for prefix in (team, other):
        made = cli("generate-key-pair", "--output-key-prefix", str(prefix))
        assert made.returncode == 0, made.stderr
    assert (tmp_path / "team.key").stat().st_mode & 0o777 == 0o600
    again = cli("generate-key-pair", "--output-key-prefix", str(team))
    assert again.returncode == 2 and "exists: not overwritten" in again.stderr

    unsigned = cli("verify", f"{registry.host}/signing/app:1", "--key", f"{team}.pub")
    assert unsigned.returncode == 1 and "NOT verified" in unsigned.stderr
    assert "is not signed" in unsigned.stderr
    signed = cli("sign", f"{registry.host}/signing/app:1", "--key", f"{team}.key")
    assert signed.returncode == 0, signed.stderr
    assert f"signed {ref}: " in signed.stdout and "(1 signature)" in signed.stdout
    verified = cli("verify", str(ref), "--key", f"{team}.pub")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"verified: {ref}\n  signed by {team}.pub (sha256:")
    resigned = cli("sign", str(ref), "--key", f"{team}.key")
    assert resigned.returncode == 0 and "already signed by this key" in resigned.stdout
    second = cli("sign", str(ref), "--key", f"{other}.key")
    assert second.returncode == 0 and "(2 signatures)" in second.stdout, second.stderr
    assert cli("verify", str(ref), "--key", f"{other}.pub").returncode == 0

    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(public_pem(ec.generate_private_key(ec.SECP256R1()).public_key()))
    untrusted = cli("verify", str(ref), "--key", str(stranger))
    assert untrusted.returncode == 1 and "2 signatures, none by a trusted key" in \
        untrusted.stderr
    by_policy = cli("verify", str(ref), STOCKADE_IMAGE_TRUSTED_KEYS=(
        f"{registry.host}/signing={other}.pub"))
    assert by_policy.returncode == 0 and f"trusted for {registry.host}/signing" in \
        by_policy.stdout, by_policy.stderr
    wrong = cli("sign", str(ref), "--key", f"{team}.key", COSIGN_PASSWORD="wrong")
    assert wrong.returncode == 2 and "wrong password" in wrong.stderr
    no_key = cli("verify", str(ref))
    assert no_key.returncode == 2 and "pass --key" in no_key.stderr
    missing = cli("sign", f"{registry.host}/signing/app@sha256:{'2' * 64}", "--key",
                  f"{team}.key")
    assert missing.returncode == 2 and "has no manifest" in missing.stderr
    assert "Traceback" not in "".join(p.stderr for p in (wrong, no_key, missing, untrusted))

    # what is in the registry is what cosign writes: an OCI manifest at sha256-HEX.sig, one
    # simple signing layer per signature, the empty image's config with one entry per layer
    doc = _signatures(client, ref)
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["config"]["mediaType"] == OCI_CONFIG
    assert [layer["mediaType"] for layer in doc["layers"]] == [SIMPLE_SIGNING] * 2
    assert all(set(layer["annotations"]) == {SIGNATURE_ANNOTATION} for layer in doc["layers"])
    assert _blob(client, ref, doc["layers"][0]) == payload_for(ref)
    digest = doc["layers"][0]["digest"]
    assert _blob(client, ref, doc["config"]) == (
        '{"architecture":"","created":"0001-01-01T00:00:00Z","history":[{"created":'
        '"0001-01-01T00:00:00Z"},{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":'
        f'{{"type":"layers","diff_ids":["{digest}","{digest}"]}},"config":{{}}}}').encode()
    client.close()


def _copy_signatures(client: Registry, source: ImageRef, target: ImageRef) -> None:
    """Put ``source``'s signature manifest (and its blobs) where ``target``'s would be."""
    doc = _signatures(client, source)
    for descriptor in (doc["config"], *doc["layers"]):
        client.push_bytes(target, _blob(client, source, descriptor))
    client.push_manifest(target, signature_tag(str(target.digest)), doc["mediaType"],
                         json.dumps(doc).encode())


def _spec(image: str) -> str:
    return f"name: signed\nimage: {image}\nsteps:\n  - name: which\n    run: cat /etc/which\n"


def test_jobs_run_only_on_images_a_trusted_key_signed(run_job, plain_registry: RunningRegistry,
                                                       tmp_path: Path) -> None:
    host = plain_registry.host
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    images = {}
    for name in ("signed", "unsigned", "stranger", "fresh"):
        images[name] = busybox_image(tmp_path, extra={"etc/which": f"{name}\n".encode()})
        images[name].push(client, f"{host}/trust/app:{name}")

    def ref(name: str, repository: str = "trust/app") -> ImageRef:
        return parse_reference(f"{host}/{repository}@{images[name].digest}")

    team, stranger = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    (tmp_path / "team.pub").write_bytes(public_pem(team.public_key()))
    sign_image(client, ref("signed"), team)
    sign_image(client, ref("stranger"), stranger)
    env = {"STOCKADE_IMAGE_REGISTRIES": host, "STOCKADE_INSECURE_REGISTRIES": host,
           "STOCKADE_IMAGE_TRUSTED_KEYS": f"{host}/trust={tmp_path / 'team.pub'}"}

    ok = run_job(_spec(f"{host}/trust/app:signed"), **env)
    assert ok.rc == 0 and ok.output("which") == "signed", ok.stderr + ok.log
    assert f"image signature verified: signed by {tmp_path / 'team.pub'} (sha256:" in ok.log
    shown = run_cli(ok.home, "show", ok.result["job_id"]).stdout
    assert "image.verified" in shown and f"trusted_for={host}/trust" in shown

    # the signed image's signatures copied to the unsigned image's signature tag; the signed
    # image copied to another repository with its signatures (their payloads name the first);
    # a tag moved from the signed image to one never signed
    _copy_signatures(client, ref("signed"), ref("unsigned"))
    images["signed"].push(client, f"{host}/trust/copy:signed")
    _copy_signatures(client, ref("signed"), ref("signed", "trust/copy"))
    images["signed"].push(client, f"{host}/trust/app:moved")
    images["fresh"].push(client, f"{host}/trust/app:moved")
    cases = {"untrusted": (f"{host}/trust/app:stranger", "none by a trusted key"),
             "other-digest": (f"{host}/trust/app:unsigned", f"not {images['unsigned'].digest}"),
             "other-repository": (f"{host}/trust/copy:signed",
                                  f"is for {host}/trust/app, not {host}/trust/copy"),
             "unsigned": (f"{host}/trust/app:moved", "is not signed")}
    for problem, (image, says) in cases.items():
        job = run_job(_spec(image), **env)
        assert job.result["failure_reason"] == "image_unverified", (problem, job.stderr)
        assert job.rc == 1 and job.result["steps"] == [] and says in job.log, (problem, job.log)
        shown = run_cli(job.home, "show", job.result["job_id"]).stdout
        assert "image.unverified" in shown and f"problem={problem}" in shown, (problem, shown)
    client.close()


def test_require_signed_images_refuses_what_no_key_covers(run_job, plain_registry:
                                                          RunningRegistry,
                                                          tmp_path: Path) -> None:
    host = plain_registry.host
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    image = busybox_image(tmp_path, extra={"etc/which": b"uncovered\n"})
    image.push(client, f"{host}/uncovered/app:1")
    client.close()
    env = {"STOCKADE_IMAGE_REGISTRIES": host, "STOCKADE_INSECURE_REGISTRIES": host,
           "STOCKADE_REQUIRE_SIGNED_IMAGES": "true"}
    for spec, says in ((_spec(f"{host}/uncovered/app:1"), "no key in image_trusted_keys"),
                       ("name: h\nsteps:\n  - name: s\n    run: 'true'\n",
                        "image: host has no signature")):
        job = run_job(spec, **env)
        assert job.result["failure_reason"] == "image_unverified", job.stderr
        assert job.result["steps"] == [] and says in job.log, job.log
    assert run_job(_spec(f"{host}/uncovered/app:1"), **{
        **env, "STOCKADE_REQUIRE_SIGNED_IMAGES": "false"}).rc == 0


def test_hostile_signature_manifests_are_refused(plain_registry: RunningRegistry,
                                                 tmp_path: Path) -> None:
    from stockade.image.cosign_keys import public_key
    from stockade.image.registry import OCI_INDEX, OCI_MANIFEST
    from stockade.image.signing import SignatureRefused, verify_image

    host = plain_registry.host
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    image = Image(tmp_path, "hostile")
    image.push(client, f"{host}/hostile/app:1")
    ref = parse_reference(f"{host}/hostile/app@{image.digest}")
    team = ec.generate_private_key(ec.SECP256R1())
    keys = (public_key(team.public_key(), "team.pub"),)
    sign_image(client, ref, team)
    good = _signatures(client, ref)
    big = client.push_bytes(ref, b"{" + b" " * 100_000 + b"}")
    layer = good["layers"][0]

    def refused(doc: dict, media_type: str = OCI_MANIFEST) -> SignatureRefused:  # type: ignore[type-arg]
        client.push_manifest(ref, signature_tag(image.digest), media_type,
                             json.dumps(doc).encode())
        try:
            verify_image(client, ref, keys)
        except SignatureRefused as e:
            return e
        raise AssertionError("accepted")

    assert verify_image(client, ref, keys).signatures == 1
    unannotated = {k: v for k, v in layer.items() if k != "annotations"}
    oversized = {**layer, "digest": big, "size": 100_002}
    cases = [({**good, "layers": [layer] * 257}, "malformed"),
             ({**good, "layers": [unannotated]}, "malformed"),
             ({**good, "layers": [oversized]}, "malformed"),
             ({**good, "layers": [{**layer, "mediaType": "application/octet-stream"}]},
              "unsigned"),
             ({**good, "layers": [{**layer, "annotations": {
                 SIGNATURE_ANNOTATION: "not base64!"}}]}, "malformed")]
    for doc, problem in cases:
        assert refused(doc).problem == problem, doc["layers"][:1]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}]}
    assert refused(index, OCI_INDEX).problem == "malformed"
    # a good signature next to bad ones still counts: any one suffices
    doc = {**good, "layers": [unannotated, oversized, layer]}
    client.push_manifest(ref, signature_tag(image.digest), OCI_MANIFEST, json.dumps(doc).encode())
    assert verify_image(client, ref, keys).signatures == 3
    client.close()
