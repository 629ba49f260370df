"""A stand-in for the internet: a network namespace the tests create, reached over a veth pair.

The host side gets 198.51.100.1/24 and 2001:db8:51::1/64 (documentation ranges); inside the
namespace, test web servers listen on several addresses of those ranges, so the egress proxy,
running on the host, reaches "internet hosts" through real routing without any traffic leaving
this machine. Everything is removed on close.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
V4 = [f"198.51.100.{i}" for i in (10, 11, 12, 13)]
V6 = ["2001:db8:51::10"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Internet:
    """The namespace, its addresses and its web servers."""

    def __init__(self, workdir: Path) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = f"stk-inet-{tag}"
        self.host_if, self.ns_if = f"stkh{tag}", f"stkn{tag}"
        self.workdir = workdir
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", "198.51.100.1/24", "dev", self.host_if)
        sh("ip", "-6", "addr", "add", "2001:db8:51::1/64", "dev", self.host_if, "nodad")
        sh("ip", "link", "set", self.host_if, "up")
        inside = ["ip", "netns", "exec", self.ns]
        for addr in V4:
            sh(*inside, "ip", "addr", "add", f"{addr}/24", "dev", self.ns_if)
        for addr in V6:
            sh(*inside, "ip", "-6", "addr", "add", f"{addr}/64", "dev", self.ns_if, "nodad")
        sh(*inside, "ip", "link", "set", self.ns_if, "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        self.cert, self.key = self._certificate()
        binds = [f"{a}:{p}" for a in V4 for p in (80, 443, 8080)] + [f"[{V6[0]}]:80"]
        ready = workdir / "internet.ready"
        self.server = subprocess.Popen(
            [*inside, sys.executable, str(HERE / "web_server.py"), *binds,
             "--tls", str(self.cert), str(self.key), "--ready", str(ready)])
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or self.server.poll() is not None:
                self.close()
                raise RuntimeError("the test internet's web server did not start")
            time.sleep(0.05)

    def _certificate(self) -> tuple[Path, Path]:
        cert, key = self.workdir / "internet.crt", self.workdir / "internet.key"
        names = "DNS:api.example.test,DNS:files.example.test,DNS:a.b.example.test"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                        "/CN=api.example.test", "-addext", f"subjectAltName={names}",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
        return cert, key

    def close(self) -> None:
        """Stop the servers and remove the namespace and the veth pair."""
        if self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
