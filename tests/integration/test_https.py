"""HTTPS inside the sandbox: the host's public CA store, plus the operator's extra CAs.

Two loopback HTTPS servers stand in for internal services, reached through the egress proxy
(an operator ``egress_internal_allow`` entry and the runner's hosts override): one with a
certificate from a CA the operator adds with ``tls_extra_ca_file``, one from a CA nobody
trusts. Jobs use curl and Python's ``urllib`` with no TLS variables and no ``--cacert``.
"""

from __future__ import annotations

import datetime
import http.server
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stockade.errors import SandboxError
from stockade.sandbox import rootfs
from tests.conftest import JobRun

TRUSTED, ROGUE = "svc.stockade.test", "rogue.stockade.test"
RunJob = Callable[..., JobRun]
PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]),
                                         critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Service:
    """A loopback HTTPS server for ``name`` whose certificate a fresh CA signed."""

    def __init__(self, name: str, workdir: Path) -> None:
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
            ec.SECP256R1())
        ca = _cert(f"{name} test CA", ca_key, f"{name} test CA", ca_key, ca=True)
        self.ca_pem = ca.public_bytes(PEM)
        self.ca_file = workdir / f"{name}-ca.pem"
        self.ca_file.write_bytes(self.ca_pem)
        chain, key_file = workdir / f"{name}.pem", workdir / f"{name}.key"
        chain.write_bytes(_cert(name, key, f"{name} test CA", ca_key, ca=False).public_bytes(PEM))
        key_file.write_bytes(_key_pem(key))
        self.key_pem = _key_pem(ca_key)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(chain, key_file)

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"hello over tls from {name}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
        self.server.daemon_threads = True
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://{name}:{self.port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Services:
    """Both servers and the runner settings that reach them."""

    def __init__(self, root: Path) -> None:
        self.trusted, self.rogue = Service(TRUSTED, root), Service(ROGUE, root)
        hosts = root / "hosts"
        hosts.write_text(f"127.0.0.1 {TRUSTED} {ROGUE}\n")
        self.env = {
            "STOCKADE_EGRESS_HOSTS_FILE": str(hosts),
            "STOCKADE_EGRESS_INTERNAL_ALLOW":
                f"127.0.0.1/32:{self.trusted.port},127.0.0.1/32:{self.rogue.port}",
        }
        self.egress = (f"{{mode: block, allow: ['{TRUSTED}:{self.trusted.port}', "
                       f"'{ROGUE}:{self.rogue.port}']}}")

    def close(self) -> None:
        self.trusted.close()
        self.rogue.close()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    s = Services(tmp_path_factory.mktemp("https"))
    yield s
    s.close()


FETCH = """\
set +e
[ -z "${SSL_CERT_FILE:-}${SSL_CERT_DIR:-}${CURL_CA_BUNDLE:-}${REQUESTS_CA_BUNDLE:-}" ] || exit 9
curl -sS --max-time 10 -o /dev/null %(url)s; echo "curl %(tag)s rc=$?"
python3 - %(url)s %(tag)s <<'PY'
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())
    print("urllib", sys.argv[2], "ok")
except Exception as e:
    print("urllib", sys.argv[2], "failed:", type(getattr(e, "reason", e)).__name__)
PY
"""


def fetch_spec(services: Services, script: str) -> str:
    indented = "\n".join("      " + line for line in script.splitlines())
    return f"name: https\negress: {services.egress}\nsteps:\n  - name: fetch\n    run: |\n" \
           f"{indented}\n"


def fetch_both(services: Services, run_job: RunJob, **env: str) -> JobRun:
    script = FETCH % {"url": services.trusted.url, "tag": "trusted"} + \
        FETCH % {"url": services.rogue.url, "tag": "rogue"}
    job = run_job(fetch_spec(services, script), **services.env, **env)
    assert job.rc == 0, job.stderr
    return job


def test_a_job_verifies_tls_against_the_operators_extra_ca(services: Services,
                                                           run_job: RunJob) -> None:
    job = fetch_both(services, run_job,
                     STOCKADE_TLS_EXTRA_CA_FILE=str(services.trusted.ca_file))
    out = job.output("fetch")
    assert "curl trusted rc=0" in out
    assert f"hello over tls from {TRUSTED}" in out and "urllib trusted ok" in out
    assert "curl rogue rc=60" in out  # "SSL certificate problem", not 77 (no CA store)
    assert "urllib rogue failed: SSLCertVerificationError" in out


def test_without_the_setting_the_host_store_is_all_a_job_trusts(services: Services,
                                                                run_job: RunJob) -> None:
    host_count = Path("/etc/ssl/certs/ca-certificates.crt").read_text().count(
        "BEGIN CERTIFICATE")
    job = fetch_both(services, run_job)
    out = job.output("fetch")
    assert "curl trusted rc=60" in out and "curl rogue rc=60" in out
    assert "urllib trusted failed: SSLCertVerificationError" in out
    count = run_job(
        "name: store\nsteps:\n  - name: count\n    run: |\n"
        "      grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt\n"
        "      python3 -c 'import ssl; print(\"ssl\", ssl.create_default_context()"
        ".cert_store_stats()[\"x509_ca\"])'\n"
        "      openssl verify -CApath /etc/ssl/certs /usr/share/ca-certificates/mozilla/"
        "ISRG_Root_X1.crt\n")
    assert count.rc == 0, count.log
    lines = count.output("count").splitlines()
    assert lines[0] == str(host_count) and lines[1] == f"ssl {host_count}"
    assert lines[2].endswith(": OK")  # the hashed directory resolves too


def test_no_private_host_file_is_visible(run_job: RunJob) -> None:
    job = run_job(
        "name: private\nsteps:\n  - name: look\n    run: |\n"
        "      test ! -e /etc/ssl/private\n"
        "      test ! -e /usr/lib/ssl/private/ssl-cert-snakeoil.key\n"
        "      ls /etc/ssl\n"
        "      if grep -rls 'PRIVATE KEY' /etc; then exit 1; fi\n"
        "      if touch /etc/ssl/certs/x 2>/dev/null; then exit 1; fi\n"
        "      echo LOOKED\n")
    assert job.rc == 0, job.log
    assert job.output("look").splitlines() == ["certs", "LOOKED"]


def _fake_host_etc(root: Path, services: Services) -> Path:
    etc = root / "etc"
    (etc / "ssl" / "certs").mkdir(parents=True)
    (etc / "ssl" / "private").mkdir(mode=0o700)
    key = services.rogue.key_pem.decode()
    (etc / "ssl" / "private" / "site.key").write_text(key)
    certs = etc / "ssl" / "certs"
    (certs / "ca-certificates.crt").write_text(services.rogue.ca_pem.decode() + key)
    (certs / "site.pem").write_text(services.rogue.ca_pem.decode() + key)  # cert and key
    (certs / "key-only.pem").write_text(key)
    os.symlink("site.pem", certs / "1a2b3c4d.0")
    os.symlink("/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt", certs / "ISRG.pem")
    os.symlink("/etc/ssl/private/site.key", certs / "absolute.pem")
    os.symlink("../private/site.key", certs / "relative.pem")
    (certs / "java").mkdir()
    (certs / "java" / "cacerts").write_text(key)
    return etc


def _all_text(tree: Path) -> str:
    return "".join(p.read_text() for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


def test_only_certificates_leave_the_host_and_updates_are_picked_up(
        services: Services, tmp_path: Path) -> None:
    host_etc, runtime = _fake_host_etc(tmp_path, services), tmp_path / "run"
    runtime.mkdir()
    etc = rootfs.synthetic_etc(runtime, host_etc, str(services.trusted.ca_file))
    certs = etc / "ssl" / "certs"
    assert "PRIVATE KEY" not in _all_text(etc)
    assert sorted(os.listdir(etc / "ssl")) == ["certs"]
    assert sorted(os.listdir(certs)) == ["1a2b3c4d.0", "ISRG.pem", "ca-certificates.crt",
                                         "site.pem"]
    assert os.readlink(certs / "ISRG.pem").startswith("/usr/share/ca-certificates/")
    bundle = (certs / "ca-certificates.crt").read_bytes()
    assert bundle == services.rogue.ca_pem + services.trusted.ca_pem
    assert (certs / "ca-certificates.crt").stat().st_mode & 0o777 == 0o644

    # update-ca-certificates writes a new bundle and renames it into place
    new = certs.parent / "new"
    new.write_bytes(services.trusted.ca_pem)
    new.rename(host_etc / "ssl" / "certs" / "ca-certificates.crt")
    updated = rootfs.synthetic_etc(runtime, host_etc, str(services.trusted.ca_file))
    assert updated != etc
    assert (updated / "ssl" / "certs" / "ca-certificates.crt").read_bytes() == \
        services.trusted.ca_pem * 2


@pytest.mark.parametrize("content", ["key", "nothing", "missing"])
def test_an_extra_ca_file_must_hold_only_certificates(services: Services, tmp_path: Path,
                                                      content: str) -> None:
    extra = tmp_path / "extra.pem"
    if content != "missing":
        extra.write_bytes(services.trusted.ca_pem + services.trusted.key_pem
                          if content == "key" else b"not a certificate\n")
    with pytest.raises(SandboxError) as raised:
        rootfs.synthetic_etc(tmp_path, Path("/etc"), str(extra))
    text = raised.value.diagnostics()
    assert "tls_extra_ca_file" in text
    for line in (services.trusted.key_pem + services.trusted.ca_pem).splitlines():
        assert line.decode() not in text or line.startswith(b"-----")  # nothing echoed
    assert not list(tmp_path.glob("etc-*"))
