"""Egress policy: allowlist entries as users write them, and the addresses always refused.

Entries (``egress.allow``):

- ``host:port`` — exactly that name and port, e.g. ``pypi.org:443``;
- ``host`` — the same with port 443;
- ``*.domain:port`` — any name with one or more labels before ``domain`` (``a.domain`` and
  ``a.b.domain``, never ``domain`` itself);
- ``CIDR:port`` — IP destinations in that network, e.g. ``203.0.113.0/24:443`` or
  ``[2001:db8::/32]:443``. Only a CIDR entry admits an IP literal.

Who may write what (DESIGN.md, trust model): a job spec may never name a network that
overlaps an always-refused range (:data:`ALWAYS_REFUSED`: loopback, link-local and cloud
metadata, private, CGNAT, ..., including IPv4 ranges hidden in IPv6 translation prefixes).
Only the operator's entries (``settings.egress_internal_allow``, parsed with
``operator=True``) may open internal destinations, and only an operator CIDR rule admits an
address in such a range.

Names are checked before they are resolved, and every resolved address is checked again, so
a permitted name that resolves to a loopback, private or metadata address is refused (DNS
rebinding).
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALWAYS_REFUSED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique local (private)"),
    ("fec0::/10", "site-local (deprecated)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
_REFUSED = tuple((ipaddress.ip_network(net), why) for net, why in ALWAYS_REFUSED)
# IPv6 prefixes that carry an IPv4 address: (prefix, first bit of the IPv4 field, XOR mask)
_TRANSLATION: tuple[tuple[ipaddress.IPv6Network, int, int, str], ...] = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), 96, 0, "IPv4-mapped"),
    (ipaddress.IPv6Network("64:ff9b::/96"), 96, 0, "NAT64"),
    (ipaddress.IPv6Network("2002::/16"), 16, 0, "6to4"),
    (ipaddress.IPv6Network("2001::/32"), 96, 0xFFFFFFFF, "Teredo"),
)
INTERNAL_FIX = ("only the operator can open internal destinations: "
                "settings egress_internal_allow")

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
RULE_HINT = ("write host:port (pypi.org:443), host (port 443), *.domain:port "
             "(*.pythonhosted.org:443) or CIDR:port (203.0.113.0/24:443, [2001:db8::/32]:443)")


class Rule(NamedTuple):
    """One allowlist entry: a name, a wildcard suffix or a network, and a port."""

    text: str
    port: int
    host: str | None = None
    suffix: str | None = None
    network: IPNetwork | None = None
    operator: bool = False  # from the operator's settings: may admit always-refused ranges

    def matches_name(self, host: str, port: int) -> bool:
        """Whether this rule admits the name ``host`` on ``port``."""
        if port != self.port:
            return False
        if self.host is not None:
            return host == self.host
        return self.suffix is not None and host.endswith("." + self.suffix)

    def matches_address(self, address: IPAddress, port: int) -> bool:
        """Whether this (CIDR) rule admits ``address`` on ``port``.

        A rule from a job spec never admits an always-refused address, whatever its network
        (the parser refuses such networks; this is the second line)."""
        if self.network is None or port != self.port:
            return False
        if address.version != self.network.version or address not in self.network:
            return False
        return self.operator or refused_range(address) is None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: {text!r} is not a port (1-65535); {RULE_HINT}")
    return int(text)


def parse_rule(entry: str, *, operator: bool = False) -> Rule:
    """Parse one allowlist entry (``ValueError`` with a hint if it is malformed).

    A job spec's entry (the default) may not name a network overlapping an always-refused
    range; ``operator=True`` is for the operator's own settings only, which may."""
    text = entry.strip().lower()
    if "/" in text:
        return _parse_cidr(entry, text, operator)
    host, sep, port_text = text.rpartition(":") if ":" in text else (text, "", "443")
    if not sep:
        host = text
    port = _port(port_text, entry)
    if is_ip(host.strip("[]")):
        ip = host.strip("[]")
        example = f"{ip}/32:{port}" if "." in ip else f"[{ip}/128]:{port}"
        raise ValueError(f"{entry!r}: an IP address needs the CIDR form, e.g. {example}")
    if host.startswith("*."):
        suffix = host[2:]
        if not _HOST.match(suffix) or "." not in suffix:
            raise ValueError(f"{entry!r}: a wildcard needs a domain with at least two labels "
                             f"after '*.', e.g. *.example.com:443")
        return Rule(entry, port, suffix=suffix, operator=operator)
    if "*" in host or not _HOST.match(host):
        raise ValueError(f"{entry!r}: {host!r} is not a host name; {RULE_HINT}")
    return Rule(entry, port, host=host, operator=operator)


def _parse_cidr(entry: str, text: str, operator: bool) -> Rule:
    if text.startswith("["):
        net_text, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        net_text, _, port_text = text.rpartition(":")
    if not net_text or not port_text:
        raise ValueError(f"{entry!r}: a CIDR entry needs a port; {RULE_HINT}")
    try:
        network = ipaddress.ip_network(net_text, strict=True)
    except ValueError as e:
        raise ValueError(f"{entry!r}: {e}; {RULE_HINT}") from None
    port = _port(port_text, entry)
    if not operator and (overlap := refused_overlap(network)):
        raise ValueError(f"{entry!r}: {network} overlaps {overlap}, which a job spec cannot "
                         f"open; {INTERNAL_FIX}")
    return Rule(entry, port, network=network, operator=operator)


def refused_overlap(network: IPNetwork) -> str | None:
    """The always-refused range ``network`` overlaps (a description), or None."""
    for refused, why in _REFUSED:
        if _overlap(network, refused):
            return f"the {why} range {refused}"
    if isinstance(network, ipaddress.IPv4Network):
        return None
    for prefix, start, flip, name in _TRANSLATION:
        if not network.overlaps(prefix):
            continue
        fixed = min(max(network.prefixlen - start, 0), 32)
        field = ((int(network.network_address) >> (96 - start)) & 0xFFFFFFFF) ^ flip
        mask = (0xFFFFFFFF << (32 - fixed)) & 0xFFFFFFFF
        embedded = ipaddress.IPv4Network((field & mask, fixed))
        for refused, why in _REFUSED:
            if _overlap(embedded, refused):
                return f"{name} addresses of the {why} range {refused}"
    return None


def _overlap(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and (int(a.network_address) <= int(b.broadcast_address)
                                       and int(b.network_address) <= int(a.broadcast_address))


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address literal."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def refused_range(address: IPAddress) -> str | None:
    """Why ``address`` is always refused (unless a CIDR rule admits it), or None."""
    for candidate in _embedded(address):
        for network, why in _REFUSED:
            if candidate.version == network.version and candidate in network:
                return f"{why} address {address}"
    return None


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The address and any IPv4 address hidden in it (mapped, 6to4, NAT64, Teredo)."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            found.append(address.ipv4_mapped)
        if address.sixtofour:
            found.append(address.sixtofour)
        if address.teredo:
            found.append(address.teredo[1])
        if address in ipaddress.ip_network("64:ff9b::/96") or int(address) >> 32 == 0:
            # NAT64, and the deprecated IPv4-compatible form ::a.b.c.d
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


class Policy(NamedTuple):
    """A job's egress policy: the mode and its rules."""

    mode: str
    rules: tuple[Rule, ...]

    @classmethod
    def from_spec(cls, mode: str, allow: tuple[str, ...], internal: tuple[str, ...] = ()
                  ) -> Policy:
        """Build from the spec's ``egress`` block plus the operator's internal destinations
        (``settings.egress_internal_allow``, which apply to every job of the runner)."""
        rules = tuple(parse_rule(a) for a in allow)
        return cls(mode, rules + tuple(parse_rule(a, operator=True) for a in internal))

    def name_allowed(self, host: str, port: int) -> bool:
        """Whether a name rule admits ``host:port``."""
        return any(r.matches_name(host, port) for r in self.rules)

    def cidr_allows(self, address: IPAddress, port: int) -> bool:
        """Whether a CIDR rule admits ``address:port`` (an always-refused address only by an
        operator's rule)."""
        return any(r.matches_address(address, port) for r in self.rules)


class Screen(NamedTuple):
    """The verdict on a destination before or after resolution."""

    allowed: bool
    reason: str
    audit_only: bool = False  # allowed only because the mode is audit
    operator_only: str | None = None  # refused: an address only the operator can open


def screen_name(policy: Policy, host: str, port: int) -> Screen:
    """Check a requested name (not an IP literal) before resolving it."""
    if policy.name_allowed(host, port):
        return Screen(True, "allowlisted")
    if policy.mode == "audit":
        return Screen(True, f"{host}:{port} is not in the allowlist", audit_only=True)
    return Screen(False, f"{host}:{port} is not in the allowlist")


def screen_address(policy: Policy, address: IPAddress, port: int, literal: bool,
                   host: frozenset[IPAddress] = frozenset()) -> Screen:
    """Check one address: always-refused ranges and the runner host's own addresses
    (``host``) need an operator's CIDR rule; literals need a CIDR rule too."""
    if any(r.operator and r.matches_address(address, port) for r in policy.rules):
        return Screen(True, "allowlisted network (operator)")
    refused = refused_range(address)
    if refused:
        return Screen(False, f"{refused} is refused (only the operator can open it, with "
                             "egress_internal_allow)", operator_only=str(address))
    if address in host or any(a in host for a in _embedded(address)[1:]):
        return Screen(False, f"{address} is an address of the runner host itself and is "
                             "refused (only the operator can open it, with "
                             "egress_internal_allow)", operator_only=str(address))
    if policy.cidr_allows(address, port):
        return Screen(True, "allowlisted network")
    if not literal:
        return Screen(True, "allowlisted")
    why = f"IP literal {address}:{port} is not in an allowlisted network"
    return Screen(True, why, audit_only=True) if policy.mode == "audit" else Screen(False, why)
