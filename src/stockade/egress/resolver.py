"""Name resolution for the egress proxy (the sandbox has no DNS; the proxy resolves).

The resolver is part of the runner's configuration, never of a job spec: ``egress_hosts_file``
makes the proxy resolve names only from a hosts-format file (for tests and air-gapped sites).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Protocol

from stockade.egress.policy import IPAddress


class ResolveError(Exception):
    """The name does not resolve."""


class Resolver(Protocol):
    """Turns a name into the addresses the proxy may connect to."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of ``host`` (``ResolveError`` if there are none)."""
        ...


class SystemResolver:
    """The host's resolver (``getaddrinfo``), IPv4 and IPv6."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of ``host``."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ResolveError(f"{host} does not resolve: {e.strerror}") from e
        out: list[IPAddress] = []
        for info in infos:
            addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if addr not in out:
                out.append(addr)
        return out


class HostsFileResolver:
    """Resolves only from a hosts-format file (``ADDRESS NAME [NAME...]`` per line)."""

    def __init__(self, path: Path) -> None:
        self.table: dict[str, list[IPAddress]] = {}
        for line in path.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            addr = ipaddress.ip_address(fields[0])
            for name in fields[1:]:
                self.table.setdefault(name.lower().rstrip("."), []).append(addr)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses the file lists for ``host``."""
        try:
            return list(self.table[host])
        except KeyError:
            raise ResolveError(f"{host} does not resolve (not in the hosts file)") from None
