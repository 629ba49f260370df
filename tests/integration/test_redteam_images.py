"""Red-team findings on images (signatures, scanning, the cache): each test is an attack that
once worked, run through stockade's own code paths (the real CLI, a real registry on
loopback). The images here are benign (files, a static busybox); what is hostile is what a
registry or an image author claims about them."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from stockade.image.reference import parse_reference
from stockade.image.registry import OCI_MANIFEST, Registry, RegistryConfig
from tests.support.images import busybox_image
from tests.support.registry import RunningRegistry


def _spec(image: str, script: str) -> str:
    return (f"name: redteam\nimage: {image}\nsteps:\n  - name: probe\n    run: |\n"
            + "".join(f"      {line}\n" for line in script.splitlines()))


def _claiming(client: Registry, where: str, diff_ids: list[str]) -> str:
    """Push to ``where`` an image whose config claims ``diff_ids`` but whose layers are
    other bytes (a gzip of nothing): its manifest digest."""
    ref = parse_reference(where)
    junk = [gzip.compress(f"not-the-layer-{n}".encode(), mtime=0) for n in range(len(diff_ids))]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    blobs = [config, *junk]
    for blob in blobs:
        client.push_bytes(ref, blob)

    def descriptor(media_type: str, blob: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "size": len(blob),
                "digest": "sha256:" + hashlib.sha256(blob).hexdigest()}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", blob)
                   for blob in junk]}).encode()
    client.push_manifest(ref, str(ref.tag), OCI_MANIFEST, manifest)
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def _plain(registry: RunningRegistry) -> tuple[str, dict[str, str]]:
    """The plain-HTTP loopback registry's host, and the settings that let jobs pull from it."""
    host = registry.host
    return host, {"STOCKADE_IMAGE_REGISTRIES": host, "STOCKADE_INSECURE_REGISTRIES": host}


def test_a_config_naming_another_images_diff_ids_does_not_get_its_cached_tree(
        run_job, plain_registry: RunningRegistry, tmp_path: Path) -> None:
    """A cached tree is found by the chain of DiffIDs an image's config claims; an image whose
    config names the DiffIDs of an image it never had (a private one the runner pulled for
    another team) must not be run on that image's tree: its own layers are what count."""
    host, env = _plain(plain_registry)
    private = busybox_image(tmp_path, extra={"opt/private/secret": b"PRIVATE-TEAM-SECRET\n"})
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    try:
        private.push(client, f"{host}/private/app:1")
        first = run_job(_spec(f"{host}/private/app:1", "true"), **env)
        assert first.rc == 0, first.stderr + first.log  # (its tree is now in the cache)
        _claiming(client, f"{host}/attacker/app:1", [private.diff_id])
    finally:
        client.close()
    stolen = run_job(_spec(f"{host}/attacker/app:1", "cat /opt/private/secret"), **env)
    assert "PRIVATE-TEAM-SECRET" not in stolen.log
    assert stolen.rc != 0 and stolen.result["failure_reason"] == "image_unverified", \
        stolen.stderr + stolen.log
    assert stolen.result["steps"] == []


def test_an_image_pinned_by_its_index_runs_from_the_cache_while_the_registry_is_down(
        run_job, plain_registry: RunningRegistry, tmp_path: Path) -> None:
    """A cached digest runs without the registry (README: Images); an image pinned by the
    digest of its index must too, not be asked of the registry at every job."""
    from stockade.image.registry import OCI_INDEX

    host, env = _plain(plain_registry)
    image = busybox_image(tmp_path, extra={"etc/greeting": b"FROM-THE-INDEX\n"})
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    try:
        image.push(client, f"{host}/test/indexed@{image.digest}")
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest),
             "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
        ref = parse_reference(f"{host}/test/indexed:1")
        index_digest = client.push_manifest(ref, "1", OCI_INDEX, index)
    finally:
        client.close()
    pinned = f"{host}/test/indexed@{index_digest}"
    first = run_job(_spec(pinned, "cat /etc/greeting"), **env)
    assert first.rc == 0 and "FROM-THE-INDEX" in first.log, first.stderr + first.log
    # the registry unknown to the runner now (plain HTTP no more): the cache must do
    again = run_job(_spec(pinned, "cat /etc/greeting"),
                    **{**env, "STOCKADE_INSECURE_REGISTRIES": ""})
    assert again.rc == 0 and "FROM-THE-INDEX" in again.log, again.stderr + again.log


def test_a_critical_advisory_folded_into_a_lesser_one_still_counts_as_critical(
        stockade_home: Path, plain_registry: RunningRegistry, tmp_path: Path) -> None:
    """A DSA whose CVEs Debian also publishes one by one is folded into their findings; when
    the DSA is critical and the CVE's own record is not (Debian's urgency, no vector), the
    image must still be refused at the critical threshold."""
    from tests.conftest import run_cli
    from tests.support.osv import CRITICAL, record, write_dir

    host = plain_registry.host
    image = busybox_image(tmp_path, extra={
        "etc/os-release": b"ID=debian\nVERSION_ID=12\n",
        "var/lib/dpkg/status": b"Package: libssl3\nStatus: install ok installed\n"
                               b"Architecture: amd64\nSource: openssl\nVersion: 3.0.11-1\n"})
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    try:
        image.push(client, f"{host}/test/folded:1")
    finally:
        client.close()
    dsa = {"id": "DSA-9999-1", "aliases": ["CVE-2099-7777"],
           "severity": [{"type": "CVSS_V3", "score": CRITICAL}],
           "affected": [{"package": {"name": "openssl", "ecosystem": "Debian:12"},
                         "ranges": [{"type": "ECOSYSTEM", "events": [
                             {"introduced": "0"}, {"fixed": "3.0.13-1"}]}]}]}
    data = write_dir(tmp_path / "osv", [
        dsa, record("CVE-2099-7777", "openssl", "3.0.13-1", urgency="low")])
    scanned = run_cli(stockade_home, "image", "scan", f"{host}/test/folded:1", "--vulns",
                      str(data), "--json", STOCKADE_IMAGE_REGISTRIES=host,
                      STOCKADE_INSECURE_REGISTRIES=host)
    doc = json.loads(scanned.stdout)
    assert doc["counts"]["critical"] == 1, doc
    assert scanned.returncode == 1, scanned.stderr


def test_a_key_file_on_a_curve_the_library_does_not_know_is_a_clear_error(
        stockade_home: Path, tmp_path: Path) -> None:
    """A PEM public key (or an encrypted cosign key) on an elliptic curve that cryptography
    does not support is a malformed key file: exit 2 with the fix, never a traceback; and a
    runner's image_trusted_keys entry naming one fails as a setting, naming the entry."""
    import subprocess

    from stockade.config import Settings
    from stockade.errors import ConfigError
    from stockade.image.cosign_keys import _pem_encode, encrypt
    from stockade.image.trust import trust_policy
    from tests.conftest import run_cli

    private, public = tmp_path / "odd.pem", tmp_path / "odd.pub"
    subprocess.run(["openssl", "ecparam", "-name", "secp112r1", "-genkey", "-noout", "-out",
                    str(private)], check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    der = subprocess.run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in",
                          str(private)], check=True, capture_output=True).stdout
    cosign_key = tmp_path / "odd.key"
    cosign_key.write_bytes(_pem_encode("ENCRYPTED SIGSTORE PRIVATE KEY", encrypt(der, b"pw")))
    image = "127.0.0.1:9/x/y@sha256:" + "a" * 64  # (never reached: the key is refused first)
    verify = run_cli(stockade_home, "image", "verify", image, "--key", str(public))
    sign = run_cli(stockade_home, "image", "sign", image, "--key", str(cosign_key),
                   COSIGN_PASSWORD="pw")
    for done in (verify, sign):
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "hint:" in done.stderr, done.stderr
    try:
        trust_policy(Settings(home=tmp_path, image_trusted_keys=(f"127.0.0.1:9={public}",)))
    except ConfigError as e:
        assert "image_trusted_keys" in e.message
    else:
        raise AssertionError("a key on an unsupported curve was trusted")


FLOOD = """\
python3 - <<'PY'
import socket, time
held = []
for i in range(600):
    try:
        held.append(socket.create_connection(("127.0.0.1", 3128), timeout=2))
    except OSError as e:
        break
print("held", len(held), flush=True)
time.sleep(20)
PY
"""


def test_egress_jobs_holding_proxy_connections_cannot_exhaust_the_runners_descriptors(
        tmp_path: Path) -> None:
    """Each egress job's proxy accepts and holds up to 64 + 256 connections, each a
    descriptor of the runner process (outside every job's cgroup). A runner agent started
    with systemd's default soft limit (1024 files) and --concurrency 4 took three such jobs
    and ran out of descriptors: a job's heartbeat thread died (EMFILE creating its HTTP
    client), its lease lapsed and it was handed out again while still running here
    (system_error). Jobs must not be able to exhaust the runner (DESIGN: the host
    boundary)."""
    import resource
    import time

    from tests.conftest import run_cli
    from tests.support.fleet import Agent, Server, admin_token, enrol_token, job_status, submit

    lenient = {"STOCKADE_ATTEST_STOCKADE_DIGESTS": "*"}  # (others edit the tree meanwhile)
    home = tmp_path / "server"
    assert run_cli(home, "jobs", **lenient).returncode == 0
    server = Server(home, **lenient)
    agent = None
    try:
        token = admin_token(home, **lenient)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # (inherited by the agent)
        try:
            agent = Agent(tmp_path / "a1", server.url, enrol_token(home, **lenient), "a1",
                          "--concurrency", "4")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        agent.wait_attested()
        egress = "egress: {mode: block, allow: []}\n"
        body = "".join(f"      {line}\n" for line in FLOOD.splitlines())
        ids = [submit(server, token, f"name: flood{i}\n{egress}steps:\n  - name: s\n"
                                     f"    run: |\n{body}") for i in range(3)]
        time.sleep(6)
        ids.append(submit(server, token, f"name: victim\n{egress}steps:\n  - name: s\n"
                                         "    run: echo VICTIM-RAN\n"))
        results = []
        for job_id in ids:
            deadline = time.monotonic() + 180
            while job_status(server, token, job_id)["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, job_id
                time.sleep(0.3)
            results.append(job_status(server, token, job_id))
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
    assert agent is not None
    assert "Too many open files" not in agent.output(), agent.output()[-3000:]
    assert [(r["name"], r["status"], r["attempt"]) for r in results] == [
        ("flood0", "succeeded", 1), ("flood1", "succeeded", 1), ("flood2", "succeeded", 1),
        ("victim", "succeeded", 1)], [(r["name"], r.get("error")) for r in results]


def _fake_build(home: Path, name: str) -> tuple[str, Path]:
    """An image ``name`` in the layout of ``home`` as ``image build`` writes one (without
    mmdebstrap): its digest and the path of its layer blob."""
    from stockade.image.layout import Layout, canonical

    home.mkdir(parents=True, exist_ok=True)
    layout = Layout(home / "layout")
    layer_bytes = gzip.compress(b"\0" * 1024, mtime=0)
    layer = layout.add_bytes(layer_bytes)
    config = layout.add_bytes(canonical({"architecture": "amd64", "os": "linux", "config": {},
                                         "rootfs": {"type": "layers", "diff_ids": [
                                             "sha256:" + hashlib.sha256(b"\0" * 1024)
                                             .hexdigest()]}}))
    manifest = layout.add_bytes(canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer.digest, "size": layer.size}]}))
    layout.tag(name, manifest)
    return manifest.digest, layer.path


def test_pushing_a_built_image_whose_blobs_are_missing_or_damaged_is_a_clear_error(
        stockade_home: Path, plain_registry: RunningRegistry) -> None:
    """``image push`` of an image whose layer blob went missing from the layout (or whose
    bytes changed) says which and how to fix it (exit 2), uploads nothing of it and puts no
    manifest in the registry; never a traceback."""
    from tests.conftest import run_cli

    host = plain_registry.host
    env = {"STOCKADE_INSECURE_REGISTRIES": host}
    digest, layer = _fake_build(stockade_home, "redteam/missing")
    layer.unlink()
    missing = run_cli(stockade_home, "image", "push", f"redteam/missing@{digest}",
                      f"{host}/redteam/missing:1", **env)
    digest2, layer2 = _fake_build(stockade_home, "redteam/damaged")
    layer2.write_bytes(b"not the layer")
    damaged = run_cli(stockade_home, "image", "push", f"redteam/damaged@{digest2}",
                      f"{host}/redteam/damaged:1", **env)
    client = Registry(RegistryConfig(insecure=frozenset({host})))
    try:
        for done, repo in ((missing, "missing"), (damaged, "damaged")):
            assert done.returncode == 2, (repo, done.stderr)
            assert "Traceback" not in done.stderr and "hint:" in done.stderr, done.stderr
            ref = parse_reference(f"{host}/redteam/{repo}:1")
            assert client.find_manifest(ref, "1") is None, repo
    finally:
        client.close()


def test_a_damaged_layout_index_is_a_clear_error(tmp_path: Path) -> None:
    """An ``index.json`` in the layout that is JSON nested beyond the parser's depth (a
    damaged or planted file) is refused with the fix, like any index that is not one."""
    from tests.conftest import run_cli

    home = tmp_path / "home"  # (a layout of its own: the session's stays whole)
    _fake_build(home, "redteam/index")
    (home / "layout" / "index.json").write_text(
        '{"manifests":' + "[" * 100_000 + "]" * 100_000 + "}")
    pushed = run_cli(home, "image", "push", "redteam/index@sha256:" + "a" * 64,
                     "127.0.0.1:9/redteam/index:1")
    assert pushed.returncode == 2, pushed.stderr
    assert "Traceback" not in pushed.stderr and "is not an OCI index" in pushed.stderr
