"""The runner host's own addresses: a destination the proxy refuses like loopback.

A service bound to all interfaces (``0.0.0.0:PORT``) answers on every address of the host, so
an address of the host itself is as internal as ``127.0.0.1``, whatever range it lies in. The
kernel's tables are read (``/proc/net/fib_trie`` for IPv4 local routes, ``/proc/net/if_inet6``
for IPv6) and re-read at most every few seconds, so an address added while a job runs is
refused too.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

from stockade.egress.policy import IPAddress

REFRESH_S = 5.0
_lock = threading.Lock()
_cache: tuple[float, frozenset[IPAddress]] = (0.0, frozenset())


def _read() -> frozenset[IPAddress]:
    found: set[IPAddress] = set()
    leaf: str | None = None
    try:
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip(" |")
            if text.startswith("-- "):
                leaf = text[3:].split()[0]
            elif text.startswith("/32 host LOCAL") and leaf:
                found.add(ipaddress.IPv4Address(leaf))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def host_addresses() -> frozenset[IPAddress]:
    """Every address assigned to this host's interfaces (cached for a few seconds)."""
    global _cache
    with _lock:
        at, addresses = _cache
        if time.monotonic() - at > REFRESH_S:
            addresses = _read()
            _cache = (time.monotonic(), addresses)
        return addresses
