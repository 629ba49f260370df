"""Egress proxy cost, side by side: a 256 MiB download and connect latency, through the proxy
(listening on TCP as it does in a job's network namespace) versus straight over loopback, and
through squid too when it is installed; a burst of 200 connections at once (queued, not
refused); and a storm of 12,000 denied CONNECTs to distinct destinations (what the result and
the audit trail keep).
Prints medians and ratios, then one ``RESULT {json}`` line per configuration. Run as root:
``make bench``.

Everything listens on 127.0.0.1. The proxy is a real :class:`JobProxy` whose policy admits
the loopback server by an operator's internal entry (loopback is otherwise always refused,
and a job spec can never name it).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stockade.api.protocol import Assignment
from stockade.config import Settings
from stockade.control.egress import egress_summary
from stockade.egress.policy import Policy
from stockade.egress.proxy import JobProxy
from stockade.egress.resolver import SystemResolver
from stockade.runner.egress import EgressSession
from stockade.runner.logs import JobLog
from stockade.spec import load_spec

SIZE = 256 * 1024 * 1024
BURST = 200
STORM = 12_000


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
    """Set up server, proxy (and squid), measure, print."""
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
    http.server.ThreadingHTTPServer.request_queue_size = 256  # the burst measures the proxy
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)  # as in a job's network namespace (sandbox/netns.py)
    proxy_address = listener.getsockname()
    policy = Policy.from_spec("block", (), internal=(f"127.0.0.1/32:{port}",))
    proxy = JobProxy(policy, SystemResolver(), listener, lambda record: None)
    proxy.start()
    paths = {"direct": None, "stockade": f"http://127.0.0.1:{proxy_address[1]}"}
    squid = start_squid(work)
    if squid:
        paths["squid"] = f"http://127.0.0.1:{squid[1]}"
    time.sleep(0.5)
    try:
        report(paths, f"http://127.0.0.1:{port}", args.n, args.latency_runs)
        burst(proxy_address, f"http://127.0.0.1:{port}/small")
        storm(work)
    finally:
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
        result(config="download", path=name, mb_s=round(mbs), vs_direct=round(mbs / direct_mbs, 2),
               ttfb_added_ms=round(added, 2))


def result(**figures: Any) -> None:
    """One machine-readable line per configuration."""
    print("RESULT " + json.dumps(figures))


def fetch(address: tuple[str, int], url: str) -> str:
    """One plain-HTTP request straight to the proxy (as a job can); the status."""
    with socket.socket() as s:
        try:
            s.connect(address)  # blocking: waits while the listen backlog is full
            s.settimeout(60)
            s.sendall(f"GET {url} HTTP/1.1\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        except OSError as e:
            return type(e).__name__
    return answer.split(b" ", 2)[1].decode() if answer else "empty"


def burst(address: tuple[str, int], url: str) -> None:
    """BURST connections at once against the default limit of 64 concurrent connections."""
    go = threading.Barrier(BURST)

    def one(_: int) -> str:
        go.wait()
        return fetch(address, url)

    started = time.monotonic()
    with ThreadPoolExecutor(BURST) as pool:
        statuses = Counter(pool.map(one, range(BURST)))
    took = time.monotonic() - started
    print(f"   burst: {BURST} connections at once: {dict(statuses)} in {took:.2f}s")
    result(config="burst", connections=BURST, ok=statuses["200"],
           refused_503=statuses["503"], other=BURST - statuses["200"] - statuses["503"],
           seconds=round(took, 2))


class Control:
    """Counts what the session reports to the audit trail."""

    def __init__(self) -> None:
        self.rows = 0

    def report(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        self.rows += len(events)


class Sandbox:
    """Only what the egress session uses: the listening socket."""

    def __init__(self, path: Path) -> None:
        self.egress_listener = socket.socket(socket.AF_UNIX)
        self.egress_listener.bind(str(path))
        self.egress_listener.listen(128)

    def kill(self) -> None:
        pass


def storm(work: Path) -> None:
    """STORM denied CONNECTs to distinct destinations through a job's egress session."""
    spec_path = work / "storm.yaml"
    spec_path.write_text("name: storm\negress: {mode: block, allow: [pypi.org]}\n"
                         "steps: [{name: a, run: 'true'}]\n")
    spec = load_spec(spec_path)
    control, sock = Control(), work / "storm.sock"
    log = JobLog(work / "storm.log", 64 * 1024 * 1024, None)
    session = EgressSession(Settings(home=work), spec, Sandbox(sock),  # type: ignore[arg-type]
                            log, control,  # type: ignore[arg-type]
                            Assignment("storm", 1, "bench", spec.to_json(), 0.0))

    def deny(i: int) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(f"CONNECT d{i}.example.test:443 HTTP/1.1\r\n\r\n".encode())
            s.recv(200)

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(deny, range(STORM)))
    took = time.monotonic() - started
    records = session.close()
    log.close()
    size = len(json.dumps(egress_summary(records)))
    print(f"   storm: {STORM} denied CONNECTs in {took:.2f}s: {control.rows} audit rows, "
          f"result egress object {size / 1024:.1f} KiB")
    result(config="denial_storm", attempts=STORM, seconds=round(took, 2),
           per_s=round(STORM / took), audit_rows=control.rows, result_bytes=size)


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
