"""Egress policy: entry parsing, wildcard semantics, always-refused ranges, decisions, and
who may open internal destinations (the operator, never a spec)."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.egress.policy import (
    Policy,
    parse_rule,
    refused_overlap,
    refused_range,
    screen_address,
    screen_name,
)


def policy(mode: str, *allow: str, internal: tuple[str, ...] = ()) -> Policy:
    return Policy.from_spec(mode, allow, internal)


@pytest.mark.parametrize("entry, host, port, hit", [
    ("pypi.org:443", "pypi.org", 443, True),
    ("pypi.org", "pypi.org", 443, True),
    ("pypi.org", "pypi.org", 80, False),
    ("PyPI.org:443", "pypi.org", 443, True),
    ("*.example.com:443", "a.example.com", 443, True),
    ("*.example.com:443", "a.b.example.com", 443, True),
    ("*.example.com:443", "example.com", 443, False),
    ("*.example.com:443", "badexample.com", 443, False),
    ("*.example.com:443", "a.example.com.evil.org", 443, False),
])
def test_name_rules(entry: str, host: str, port: int, hit: bool) -> None:
    assert parse_rule(entry).matches_name(host, port) is hit


@pytest.mark.parametrize("entry, address, port, hit", [
    ("203.0.113.0/24:443", "203.0.113.9", 443, True),
    ("203.0.113.0/24:443", "203.0.114.9", 443, False),
    ("203.0.113.0/24:443", "203.0.113.9", 80, False),
    ("[2001:db8::/32]:443", "2001:db8::1", 443, True),
    ("2001:db8::/32:443", "2001:db9::1", 443, False),
])
def test_cidr_rules(entry: str, address: str, port: int, hit: bool) -> None:
    assert parse_rule(entry).matches_address(ipaddress.ip_address(address), port) is hit


@pytest.mark.parametrize("entry, overlap", [
    ("127.0.0.1/32:8080", "loopback range 127.0.0.0/8"),
    ("169.254.169.254/32:80", "link-local (cloud metadata) range 169.254.0.0/16"),
    ("10.0.0.0/8:22", "private (RFC 1918) range 10.0.0.0/8"),
    ("[fe80::/10]:443", "link-local range fe80::/10"),
    ("[::1/128]:80", "loopback range ::1/128"),
    ("[fd00:ec2::254/128]:80", "unique local (private) range fc00::/7"),
    ("100.64.0.0/10:443", "carrier-grade NAT range"),
    ("172.0.0.0/8:443", "private (RFC 1918) range 172.16.0.0/12"),  # a supernet overlaps too
    ("0.0.0.0/0:443", "unspecified range 0.0.0.0/8"),
    ("[::/0]:443", "unspecified range ::/128"),
    ("[::ffff:127.0.0.1/128]:80", "IPv4-mapped addresses of the loopback range"),
    ("[::ffff:0:0/96]:80", "IPv4-mapped addresses"),
    ("[2002:a9fe:a9fe::/48]:80", "6to4 addresses of the link-local (cloud metadata) range"),
    ("[64:ff9b::a00:1/128]:80", "NAT64 addresses of the private (RFC 1918) range"),
    ("[2001::80ff:fffe/128]:80", "Teredo addresses of the loopback range"),
    ("[2000::/3]:443", "6to4 addresses"),
])
def test_a_spec_can_never_open_internal_ranges(entry: str, overlap: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_rule(entry)
    message = str(e.value)
    assert message.startswith(repr(entry)) and overlap in message
    assert ("only the operator can open internal destinations: settings "
            "egress_internal_allow") in message


@pytest.mark.parametrize("entry", ["203.0.113.0/24:443", "[2001:db8::/32]:443",
                                   "100.128.0.0/9:443", "172.32.0.0/11:443",
                                   "[::ffff:c633:640b/128]:80", "[2002:c633:640b::/48]:80",
                                   "[64:ff9b::c633:640b/128]:80"])
def test_public_networks_stay_open_to_specs(entry: str) -> None:
    assert refused_overlap(parse_rule(entry).network) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("entry, address, port", [
    ("10.0.0.0/8:5432", "10.1.2.3", 5432),
    ("127.0.0.1/32:8080", "127.0.0.1", 8080),
    ("169.254.169.254/32:80", "169.254.169.254", 80),
    ("[fe80::/10]:443", "fe80::1", 443),
])
def test_the_operator_may_open_internal_ranges(entry: str, address: str, port: int) -> None:
    rule = parse_rule(entry, operator=True)
    assert rule.operator and rule.matches_address(ipaddress.ip_address(address), port)
    assert not rule.matches_address(ipaddress.ip_address(address), port + 1)


def test_a_spec_rule_never_admits_an_always_refused_address() -> None:
    """Second line behind the parser: even a Rule built by hand from a spec refuses them."""
    wide = parse_rule("[::ffff:c633:640b/128]:80")
    sneaky = type(wide)("x", 80, network=ipaddress.ip_network("::ffff:0:0/96"))
    assert not sneaky.matches_address(ipaddress.ip_address("::ffff:127.0.0.1"), 80)
    assert sneaky.matches_address(ipaddress.ip_address("::ffff:198.51.100.11"), 80)


def test_internal_entries_apply_besides_the_spec() -> None:
    p = policy("block", "api.example.test:443", internal=("10.1.0.0/16:5432",))
    db = ipaddress.ip_address("10.1.2.3")
    assert screen_address(p, db, 5432, literal=True).allowed
    assert not screen_address(p, db, 5433, literal=True).allowed
    assert not screen_address(policy("block", "api.example.test:443"), db, 5432,
                              literal=True).allowed
    with pytest.raises(ValueError, match="egress_internal_allow"):
        policy("block", "10.1.0.0/16:5432")


@pytest.mark.parametrize("entry, message", [
    ("1.2.3.4:443", "needs the CIDR form, e.g. 1.2.3.4/32:443"),
    ("[::1]:443", "needs the CIDR form, e.g. [::1/128]:443"),
    ("*.com:443", "a wildcard needs a domain with at least two labels"),
    ("*:443", "'*' is not a host name"),
    ("a.*.com:443", "is not a host name"),
    ("pypi.org:0", "is not a port"),
    ("pypi.org:99999", "is not a port"),
    ("pypi.org:https", "is not a port"),
    ("10.0.0.1/8:443", "has host bits set"),
    ("10.0.0.0/8", "needs a port"),
    ("bad_name:443", "is not a host name"),
    ("", "is not a host name"),
])
def test_invalid_entries(entry: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_rule(entry)
    assert message in str(e.value)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.9.9.9", "10.1.1.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
    "::1", "::", "fd00:ec2::254", "fc00::1", "fe80::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::a00:1",
])
def test_always_refused(address: str) -> None:
    assert refused_range(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "198.51.100.10", "2001:db8::1", "2606:4700::1",
                                     "172.32.0.1", "100.128.0.1"])
def test_public_addresses_are_not_refused(address: str) -> None:
    assert refused_range(ipaddress.ip_address(address)) is None


def test_block_mode_refuses_unlisted_names_before_resolving() -> None:
    p = policy("block", "pypi.org:443")
    assert screen_name(p, "pypi.org", 443).allowed
    verdict = screen_name(p, "evil.org", 443)
    assert not verdict.allowed and "not in the allowlist" in verdict.reason


def test_audit_mode_allows_but_marks() -> None:
    verdict = screen_name(policy("audit"), "evil.org", 443)
    assert verdict.allowed and verdict.audit_only


def test_private_address_needs_an_explicit_cidr() -> None:
    metadata = ipaddress.ip_address("169.254.169.254")
    assert not screen_address(policy("audit"), metadata, 80, literal=False).allowed
    assert not screen_address(policy("block", "*.internal.example:80"), metadata, 80,
                              literal=False).allowed
    assert not screen_address(policy("audit", internal=("169.254.169.253/32:80",)), metadata,
                              80, literal=True).allowed
    assert screen_address(policy("block", internal=("169.254.169.254/32:80",)), metadata, 80,
                          literal=True).allowed


def test_ip_literals_need_a_cidr_in_block_mode_only() -> None:
    public = ipaddress.ip_address("198.51.100.7")
    assert not screen_address(policy("block", "x.example:80"), public, 80, literal=True).allowed
    audit = screen_address(policy("audit"), public, 80, literal=True)
    assert audit.allowed and audit.audit_only
    assert screen_address(policy("block", "x.example:80"), public, 80, literal=False).allowed


def test_the_runner_hosts_own_addresses_need_an_operator_rule() -> None:
    own = ipaddress.ip_address("203.0.113.7")
    spec = Policy.from_spec("block", ("203.0.113.0/24:80",))
    assert not screen_address(spec, own, 80, literal=True, host=frozenset({own})).allowed
    assert screen_address(spec, ipaddress.ip_address("203.0.113.8"), 80, literal=True,
                          host=frozenset({own})).allowed
    operator = Policy.from_spec("block", (), internal=("203.0.113.7/32:80",))
    assert screen_address(operator, own, 80, literal=True, host=frozenset({own})).allowed


@pytest.mark.parametrize("address", ["198.18.0.1", "192.0.0.8", "fec0::1", "::7f00:1"])
def test_more_non_global_ranges_are_refused(address: str) -> None:
    assert refused_range(ipaddress.ip_address(address)) is not None
