"""Real OCI registries (Debian's ``docker-registry``, distribution 2.8) that the test session
starts on loopback and stops itself, with a config file of ours (the packaged one listens on
every interface: never used).

``registry`` (session): TLS with a throwaway CA and HTTP basic auth (htpasswd, bcrypt).
``plain_registry`` (session): plain HTTP without auth, for mirror and insecure-registry tests.
``token_registry`` (session): TLS with bearer tokens (the registry's ``token`` auth) from a
small token server here, which checks basic credentials and signs ES256 JWTs the registry
trusts (``x5c`` naming a certificate in its ``rootcertbundle``).
Each stores under its own temporary directory, removed when it stops. ``make test`` installs
the package (``docker-registry``, and ``apache2-utils`` for ``htpasswd``); without it the tests
that need one fail and say how to install it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

BINARY = "/usr/bin/docker-registry"
USER, PASSWORD = "ci", "registry-test-password"


class RunningRegistry(NamedTuple):
    """A running registry: ``host`` is ``127.0.0.1:PORT``."""

    host: str
    ca_file: str | None  # None: plain HTTP
    credentials: tuple[str, str] | None
    process: subprocess.Popen[bytes]
    base: Path
    tokens: _TokenServer | None = None  # the token server of a token_registry

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"{'https' if self.ca_file else 'http'}://{self.host}"

    def stop(self) -> None:
        """Stop it and remove its storage."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.tokens is not None:
            self.tokens.http.shutdown()
            self.tokens.http.server_close()
        shutil.rmtree(self.base, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tls(base: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 and localhost signed by it."""
    ca_key, ca, key, csr, cert = (base / n for n in ("ca.key", "ca.pem", "tls.key", "tls.csr",
                                                     "tls.pem"))
    run = [("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=stockade test CA", "-keyout", str(ca_key),
            "-out", str(ca)),
           ("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)),
           ("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", "/dev/stdin")]
    for i, argv in enumerate(run):
        subprocess.run(argv, check=True, capture_output=True,
                       input=b"subjectAltName=IP:127.0.0.1,DNS:localhost\n" if i == 2 else None)
    return ca, cert, key


class _TokenServer:
    """Issues registry tokens for ``USER``/``PASSWORD`` (HTTPS on loopback), and counts them."""

    def __init__(self, base: Path, cert: Path, key: Path) -> None:
        import base64
        import http.server
        import threading

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        from joserfc import jwt
        from joserfc.jwk import ECKey

        signer = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stockade test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        signing_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                        .public_key(signer.public_key()).serial_number(1)
                        .not_valid_before(now - datetime.timedelta(minutes=5))
                        .not_valid_after(now + datetime.timedelta(days=1))
                        .sign(signer, hashes.SHA256()))
        self.bundle = base / "token-root.pem"
        self.bundle.write_bytes(signing_cert.public_bytes(serialization.Encoding.PEM))
        x5c = base64.b64encode(signing_cert.public_bytes(serialization.Encoding.DER)).decode()
        key_pem = signer.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
        jwk = ECKey.import_key(key_pem)
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        outer = self
        self.issued = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlparse

                query = parse_qs(urlparse(self.path).query)
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                kind, repo, actions = [*query.get("scope", ["::"])[0].split(":"), "", ""][:3]
                at = int(time.time())
                claims = {"iss": "stockade-test-issuer", "sub": USER, "aud": "stockade-test",
                          "exp": at + 300, "nbf": at - 10, "iat": at, "jti": str(at),
                          "access": [{"type": kind, "name": repo,
                                      "actions": [a for a in actions.split(",") if a]}]}
                token = jwt.encode({"alg": "ES256", "x5c": [x5c]}, claims, jwk)
                body = json.dumps({"token": token}).encode()
                outer.issued += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.realm = f"https://127.0.0.1:{self.http.server_address[1]}/token"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


def start(tls_and_auth: bool, tokens: bool = False) -> RunningRegistry:
    """Start one registry (see the module docstring)."""
    if not Path(BINARY).exists():
        pytest.fail(f"{BINARY} is missing: install it with apt-get install docker-registry "
                    "apache2-utils (make test does)")
    base = Path(tempfile.mkdtemp(prefix="stockade-test-registry-"))
    ca, token_server = None, None
    if tls_and_auth:
        ca_path, cert, key = _tls(base)
        ca = str(ca_path)
        if tokens:
            token_server = _TokenServer(base, cert, key)
    port = _free_port()  # (after the token server took its own)
    lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
             "storage:", "  filesystem:", f"    rootdirectory: {base / 'data'}",
             "  delete:", "    enabled: true", "http:", f"  addr: 127.0.0.1:{port}",
             "  secret: stockade-test"]
    if tls_and_auth:
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}", "auth:"]
        if token_server is not None:
            lines += ["  token:", f"    realm: {token_server.realm}",
                      "    service: stockade-test", "    issuer: stockade-test-issuer",
                      f"    rootcertbundle: {token_server.bundle}"]
        else:
            htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                      capture_output=True).stdout
            (base / "htpasswd").write_bytes(htpasswd)
            lines += ["  htpasswd:", "    realm: stockade-test",
                      f"    path: {base / 'htpasswd'}"]
    (base / "config.yml").write_text("\n".join(lines) + "\n")
    log = (base / "registry.log").open("wb")
    process = subprocess.Popen([BINARY, "serve", str(base / "config.yml")], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    made = RunningRegistry(f"127.0.0.1:{port}", ca, (USER, PASSWORD) if tls_and_auth else None,
                           process, base, token_server)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(httpx.HTTPError):
            verify = ssl.create_default_context(cafile=ca) if ca else False
            answer = httpx.get(f"{made.url}/v2/", verify=verify, timeout=2)
            # (the registry's own answer: the port was free when picked, another server of
            # ours, such as the token server, may have taken it since)
            if answer.status_code in (200, 401) and \
                    "docker-distribution-api-version" in answer.headers:
                return made
        if process.poll() is not None or time.monotonic() > deadline:
            made.stop()
            pytest.fail("the test registry did not start: "
                        + (base / "registry.log").read_text(errors="replace")[-2000:])
        time.sleep(0.1)


@pytest.fixture(scope="session")
def registry() -> Iterator[RunningRegistry]:
    made = start(tls_and_auth=True)
    yield made
    made.stop()


@pytest.fixture(scope="session")
def token_registry() -> Iterator[RunningRegistry]:
    made = start(tls_and_auth=True, tokens=True)
    yield made
    made.stop()


@pytest.fixture(scope="session")
def plain_registry() -> Iterator[RunningRegistry]:
    made = start(tls_and_auth=False)
    yield made
    made.stop()
