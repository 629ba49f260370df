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


def test_host_is_rewritten_to_the_checked_authority() -> None:
    """Domain fronting: the Host header says evil, the absolute URI (which was checked) says
    api: upstream sees only api."""
    r = parse(b"GET http://api.example.test/x HTTP/1.1\r\nHost: evil.example.test\r\n"
              b"Accept: */*\r\n\r\n")
    head = r.origin_head().decode()
    assert "evil" not in head
    assert head.split("\r\n")[:3] == ["GET /x HTTP/1.1", "Host: api.example.test", "Accept: */*"]


@pytest.mark.parametrize("target, host", [
    ("http://a.test:8080/", "a.test:8080"),
    ("http://a.test:80/", "a.test"),
    ("http://[2001:db8::1]:8080/", "[2001:db8::1]:8080"),
    ("http://[2001:db8::1]/", "[2001:db8::1]"),
])
def test_host_header_of_the_authority(target: str, host: str) -> None:
    r = parse(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert f"\r\nHost: {host}\r\n" in r.origin_head().decode()


def test_headers_named_by_connection_are_dropped() -> None:
    r = parse(b"GET http://a.test/ HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\n"
              b"X-Secret: 1\r\nX-Other: 2\r\n\r\n")
    head = r.origin_head().decode()
    assert "X-Secret" not in head and "X-Other: 2" in head and "keep-alive" not in head


@pytest.mark.parametrize("headers, status", [
    (b"Host: a.test\r\nHost: b.test\r\n", 400),
    (b"host: a.test\r\nHOST: a.test\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n", 411),
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 411),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: 0x10\r\n", 400),
    (b"Content-Length: 99999999999999999999\r\n", 400),
])
def test_ambiguous_requests_are_refused(headers: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as e:
        parse(b"POST http://a.test/ HTTP/1.1\r\n" + headers + b"\r\n")
    assert e.value.status == status


def test_the_body_length_is_known() -> None:
    assert parse(b"POST http://a.test/ HTTP/1.1\r\nContent-Length: 12\r\n"
                 b"content-length: 12\r\n\r\n").content_length == 12
    assert parse(b"GET http://a.test/ HTTP/1.1\r\n\r\n").content_length == 0


def test_the_host_as_written_is_kept_for_masking() -> None:
    assert parse(b"CONNECT SeCrEt.X.test:443 HTTP/1.1\r\n\r\n").written_host == "SeCrEt.X.test"
    r = parse(b"GET http://SeCrEt.X.test/ HTTP/1.1\r\n\r\n")
    assert (r.host, r.written_host) == ("secret.x.test", "SeCrEt.X.test")
    assert parse(b"GET http://[2001:DB8::1]:81/ HTTP/1.1\r\n\r\n").written_host == "2001:DB8::1"


@pytest.mark.parametrize("head", [
    b"GET http://a.test/v HTTP/1.1\nHost: forbidden.test\r\n\r\n",  # bare LF adds a header
    b"GET http://a.test/ HTTP/1.1\r\nX-A: a\n\nGET /smuggled HTTP/1.1\r\n\r\n",  # smuggling
    b"GET http://a.test/ HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    b"GET http://a.test/ HTTP/1.1\r\nX-A: a\x00\r\n\r\n",
    b"GET http://a.test/ HTTP/1.9\r\n\r\n",
    b"CONNECT " + b"a" * 260 + b".test:443 HTTP/1.1\r\n\r\n",
])
def test_heads_that_could_smuggle_or_bloat_are_refused(head: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        parse(head)
    assert e.value.status == 400
