"""Egress proxy cost, side by side: a 256 MiB download and connect latency, through the proxy
(and the in-sandbox forwarder, socat) versus straight over loopback, and through squid too
when it is installed. Prints medians and ratios. Run as root: ``make bench``.

Everything listens on 127.0.0.1. The proxy is a real :class:`JobProxy` whose policy admits
the loopback server by an explicit CIDR rule (loopback is otherwise always refused).
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from stockade.egress.policy import Policy
from stockade.egress.proxy import JobProxy
from stockade.egress.resolver import SystemResolver
from stockade.sandbox.plumbing import forwarder_argv

SIZE = 256 * 1024 * 1024


class FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves the payload with sendfile (so the server is never the bottleneck)."""

    protocol_version = "HTTP/1.1"
    payload: Path

    def do_GET(self) -> None:
        size = self.payload.stat().st_size if self.path == "/big" else 2
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.path != "/big":
            self.wfile.write(b"ok")
            return
        self.wfile.flush()
        with self.payload.open("rb") as f:
            self.connection.sendfile(f)

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def curl(url: str, proxy: str | None, what: str) -> float:
    """One curl run; returns total time (``what=total``) or time to first byte (``ttfb``)."""
    fmt = "%{time_total}" if what == "total" else "%{time_starttransfer}"
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", fmt, "--noproxy", ""]
    if proxy:
        argv += ["-p", "-x", proxy]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    return float(out)


def main() -> None:
    """Set up server, proxy, forwarder (and squid), measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="downloads per path (default 7)")
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stockade-egress-bench-", dir="/dev/shm"))
    payload = work / "payload"
    with payload.open("wb") as f:
        f.truncate(SIZE)
    FileHandler.payload = payload
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(work / "egress.sock"))
    listener.listen(128)
    policy = Policy.from_spec("block", (f"127.0.0.1/32:{port}",))
    proxy = JobProxy(policy, SystemResolver(), listener, lambda record: None)
    proxy.start()
    fwd_port = free_port()
    forwarder = subprocess.Popen(forwarder_argv(fwd_port, str(work / "egress.sock")))
    paths = {"direct": None, "stockade": f"http://127.0.0.1:{fwd_port}"}
    squid = start_squid(work)
    if squid:
        paths["squid"] = f"http://127.0.0.1:{squid[1]}"
    time.sleep(0.5)
    try:
        report(paths, f"http://127.0.0.1:{port}", args.n, args.latency_runs)
    finally:
        forwarder.kill()
        proxy.stop()
        server.shutdown()
        if squid:
            squid[0].kill()
        shutil.rmtree(work, ignore_errors=True)


def report(paths: dict[str, str | None], base: str, n: int, latency_runs: int) -> None:
    """Interleave the paths run by run so that all see the same machine load."""
    totals: dict[str, list[float]] = {k: [] for k in paths}
    ttfb: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(n):
        for name, proxy in paths.items():
            totals[name].append(curl(f"{base}/big", proxy, "total"))
    for _ in range(latency_runs):
        for name, proxy in paths.items():
            ttfb[name].append(curl(f"{base}/small", proxy, "ttfb"))
    direct_mbs = SIZE / statistics.median(totals["direct"]) / 1e6
    direct_ttfb = statistics.median(ttfb["direct"])
    for name in paths:
        mbs = SIZE / statistics.median(totals[name]) / 1e6
        added = (statistics.median(ttfb[name]) - direct_ttfb) * 1000
        print(f"{name:>8}: 256 MiB download {mbs:8.0f} MB/s  ({mbs / direct_mbs:.2f}x direct)  "
              f"time to first byte +{added:.2f} ms vs direct (median of {latency_runs})")


def start_squid(work: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    """squid on 127.0.0.1 allowing CONNECT to any port, if installed."""
    binary = shutil.which("squid", path="/usr/sbin:/usr/bin")
    if not binary:
        print("squid is not installed (apt-get install squid): skipping the squid column")
        return None
    port = free_port()
    conf = work / "squid.conf"
    conf.write_text(f"http_port 127.0.0.1:{port}\nhttp_access allow all\n"
                    "acl SSL_ports port 1-65535\nacl CONNECT method CONNECT\n"
                    f"pid_filename {work}/squid.pid\ncache deny all\n"
                    f"access_log none\ncache_log {work}/cache.log\n"
                    "cache_effective_user proxy\nshutdown_lifetime 0 seconds\n")
    proc = subprocess.Popen([binary, "-N", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.1)
    proc.kill()
    print("squid did not start: skipping the squid column")
    return None


if __name__ == "__main__":
    os.umask(0o022)
    main()
