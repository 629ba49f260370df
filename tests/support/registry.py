"""Real OCI registries (Debian's ``docker-registry``, distribution 2.8) that the test session
starts on loopback and stops itself, with a config file of ours (the packaged one listens on
every interface: never used).

``registry`` (session): TLS with a throwaway CA and HTTP basic auth (htpasswd, bcrypt).
``plain_registry`` (session): plain HTTP without auth, for mirror and insecure-registry tests.
Each stores under its own temporary directory, removed when it stops. ``make test`` installs
the package (``docker-registry``, and ``apache2-utils`` for ``htpasswd``); without it the tests
that need one fail and say how to install it.
"""

from __future__ import annotations

import contextlib
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


def start(tls_and_auth: bool) -> RunningRegistry:
    """Start one registry (see the module docstring)."""
    if not Path(BINARY).exists():
        pytest.fail(f"{BINARY} is missing: install it with apt-get install docker-registry "
                    "apache2-utils (make test does)")
    base = Path(tempfile.mkdtemp(prefix="stockade-test-registry-"))
    port = _free_port()
    lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
             "storage:", "  filesystem:", f"    rootdirectory: {base / 'data'}",
             "  delete:", "    enabled: true", "http:", f"  addr: 127.0.0.1:{port}",
             "  secret: stockade-test"]
    ca = None
    if tls_and_auth:
        ca_path, cert, key = _tls(base)
        ca = str(ca_path)
        htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                  capture_output=True).stdout
        (base / "htpasswd").write_bytes(htpasswd)
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}", "auth:",
                  "  htpasswd:", "    realm: stockade-test", f"    path: {base / 'htpasswd'}"]
    (base / "config.yml").write_text("\n".join(lines) + "\n")
    log = (base / "registry.log").open("wb")
    process = subprocess.Popen([BINARY, "serve", str(base / "config.yml")], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    made = RunningRegistry(f"127.0.0.1:{port}", ca, (USER, PASSWORD) if tls_and_auth else None,
                        process, base)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(httpx.HTTPError):
            verify = ssl.create_default_context(cafile=ca) if ca else False
            if httpx.get(f"{made.url}/v2/", verify=verify, timeout=2).status_code in (200, 401):
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
def plain_registry() -> Iterator[RunningRegistry]:
    made = start(tls_and_auth=False)
    yield made
    made.stop()
