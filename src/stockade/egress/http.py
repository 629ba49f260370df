"""Parsing proxy requests: bounded, strict, never trusting the client.

A plain-HTTP request is forwarded as exactly one request to exactly the authority that was
checked: its ``Host`` header is rewritten to that authority (a client cannot front another
site on the same address), a duplicate ``Host`` is refused, and its body is delimited by
``Content-Length`` only (``Transfer-Encoding`` bodies get 411), so nothing the client sends
after it can pass for a second request.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

from stockade.text import digits

MAX_HEAD = 16 * 1024
MAX_HOST = 253  # the longest DNS name
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in header values
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade"}


class BadRequest(Exception):
    """The request cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request(NamedTuple):
    """A parsed proxy request: CONNECT (tunnel) or an absolute-URI plain HTTP request."""

    method: str
    host: str
    port: int
    path: str
    version: str
    headers: list[tuple[str, str]]
    content_length: int = 0  # plain HTTP: the body's length (never more is forwarded)
    written_host: str = ""  # the host as the client spelled it (case kept), for masking

    @property
    def is_tunnel(self) -> bool:
        """CONNECT: the client speaks TLS (or anything) end to end after our 200."""
        return self.method == "CONNECT"

    @property
    def authority(self) -> str:
        """The checked ``host[:port]`` as a ``Host`` header says it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    def origin_head(self) -> bytes:
        """The request head to send upstream: origin-form, ``Host`` set to the checked
        authority, no proxy or hop-by-hop headers, and ``Connection: close``."""
        dropped = set(HOP_BY_HOP) | {"host"}
        for name, value in self.headers:
            if name.lower() == "connection":  # headers a Connection header names are hop-by-hop
                dropped |= {token.strip().lower() for token in value.split(",")}
        lines = [f"{self.method} {self.path} {self.version}", f"Host: {self.authority}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in dropped]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse(head: bytes) -> Request:
    """Parse a request head (``BadRequest`` if it is malformed or unsupported)."""
    if len(head) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request head is not ASCII") from None
    request_line, *header_lines = text.removesuffix("\r\n\r\n").split("\r\n")
    # a bare CR or LF, a NUL or any other control character could split one checked request
    # into two (or add a header) for the server behind: refused, never passed on
    if any(_CONTROL.search(line) for line in (request_line, *header_lines)):
        raise BadRequest(400, "control characters (bare CR or LF, NUL, ...) in the request head")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    headers = []
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise BadRequest(400, "malformed header line")
        headers.append((name, value.strip()))
    if method == "CONNECT":
        host, port = split_authority(target, default_port=None)
        return Request(method, host, port, "", version, headers, 0, _written(target))
    if method not in METHODS:
        raise BadRequest(405, f"method {method[:20]!r} not allowed")
    url = urlsplit(target)
    if url.scheme != "http" or not url.netloc:
        raise BadRequest(400, "plain HTTP needs an absolute http:// URI; use CONNECT for TLS")
    host, port = split_authority(url.netloc, default_port=80)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    return Request(method, host, port, path, version, headers, _body_length(headers),
                   _written(url.netloc))


def _body_length(headers: list[tuple[str, str]]) -> int:
    """The request body's length: ``Content-Length`` only, one value, never chunked."""
    names = [k.lower() for k, _ in headers]
    if names.count("host") > 1:
        raise BadRequest(400, "duplicate Host header")
    if "transfer-encoding" in names:
        raise BadRequest(411, "Transfer-Encoding request bodies are not supported through "
                              "this proxy; send a Content-Length")
    lengths = {v for k, v in headers if k.lower() == "content-length"}
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise BadRequest(400, "conflicting Content-Length headers")
    value = lengths.pop()
    if not digits(value) or len(value) > 18:
        raise BadRequest(400, "malformed Content-Length")
    return int(value)


def _written(authority: str) -> str:
    """The host part of ``authority`` as the client spelled it (only for masking)."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if ":" in authority else authority


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into a normalised host and a port."""
    if "@" in authority:
        raise BadRequest(400, "credentials in the authority are not allowed")
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise BadRequest(400, "malformed IPv6 authority")
    else:
        host, _, port_text = authority.partition(":")
    if not port_text:
        if default_port is None:
            raise BadRequest(400, "CONNECT needs host:port")
        port = default_port
    elif digits(port_text) and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise BadRequest(400, f"bad port {port_text!r}")
    host = host.lower().rstrip(".")
    if not host or any(c.isspace() for c in host):
        raise BadRequest(400, "missing host")
    if len(host) > MAX_HOST:
        raise BadRequest(400, f"host name longer than {MAX_HOST} characters")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not all(c.isalnum() or c in "-." for c in host):
            raise BadRequest(400, f"{host!r} is not a host name") from None
    return host, port


def response(status: int, reason: str, body: str = "") -> bytes:
    """A complete small HTTP/1.1 response that closes the connection."""
    data = body.encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n"
            "Proxy-Agent: stockade\r\n\r\n").encode() + data
