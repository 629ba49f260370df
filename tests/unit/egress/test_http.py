"""Proxy request parsing: absolute URIs, CONNECT, and everything malformed."""

from __future__ import annotations

import pytest

from stockade.egress.http import BadRequest, parse, split_authority


def test_connect() -> None:
    r = parse(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n")
    assert (r.method, r.host, r.port, r.is_tunnel) == ("CONNECT", "pypi.org", 443, True)


def test_absolute_uri_is_rewritten_to_origin_form() -> None:
    r = parse(b"GET http://Example.COM:8080/a/b?q=1 HTTP/1.1\r\nHost: example.com\r\n"
              b"Proxy-Authorization: secret\r\nProxy-Connection: keep-alive\r\n\r\n")
    assert (r.host, r.port, r.path) == ("example.com", 8080, "/a/b?q=1")
    head = r.origin_head().decode()
    assert head.startswith("GET /a/b?q=1 HTTP/1.1\r\n")
    assert "Proxy-" not in head and "Connection: close" in head


def test_ipv6_authority() -> None:
    assert split_authority("[2001:DB8::1]:443", None) == ("2001:db8::1", 443)
    assert split_authority("[::1]", 80) == ("::1", 80)


@pytest.mark.parametrize("head, status", [
    (b"\x00\xff\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET https://x/ HTTP/1.1\r\n\r\n", 400),
    (b"BREW http://x/ HTTP/1.1\r\n\r\n", 405),
    (b"CONNECT x HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT x:99999 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT user@x:443 HTTP/1.1\r\n\r\n", 400),
    (b"GET http://x/ HTTP/2\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\nbad header\r\n\r\n", 400),
    (b"GET http://x y/ HTTP/1.1\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\n" + b"A: " + b"b" * 20000 + b"\r\n\r\n", 431),
])
def test_malformed(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as e:
        parse(head)
    assert e.value.status == status
