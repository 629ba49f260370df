"""Untrusted jobs: their egress may ask for no more than the operator's untrusted allowlist."""

from __future__ import annotations

import pytest

from stockade.egress.admission import covered, untrusted_ceiling, untrusted_refusal
from stockade.egress.policy import parse_rule

CEILING = ("pypi.org:443", "*.pythonhosted.org:443", "203.0.113.0/24:443",
           "[2001:db8::/32]:443", "git.example.com:22")


@pytest.mark.parametrize("allow", [
    (),
    ("pypi.org:443",),
    ("pypi.org",),  # = pypi.org:443
    ("PyPI.org:443",),
    ("files.pythonhosted.org:443", "a.b.pythonhosted.org:443"),
    ("*.pythonhosted.org:443",),
    ("*.cdn.pythonhosted.org:443",),
    ("203.0.113.0/24:443", "203.0.113.128/25:443", "203.0.113.7/32:443"),
    ("[2001:db8:1::/48]:443",),
    ("git.example.com:22",),
])
def test_covered_requests_are_admitted(allow: tuple[str, ...]) -> None:
    assert untrusted_refusal("block", allow, CEILING) is None


@pytest.mark.parametrize("allow, shown", [
    (("evil.example:443",), "'evil.example:443'"),
    (("pypi.org:80",), "'pypi.org:80'"),  # same host, other port
    (("pythonhosted.org:443",), "'pythonhosted.org:443'"),  # the apex is not under *.
    (("*.org:443",), None),  # refused by the parser: too broad
    (("*.example.com:22",), "'*.example.com:22'"),  # wider than the host it names
    (("203.0.112.0/23:443",), "'203.0.112.0/23:443'"),  # a supernet of the operator's
    (("203.0.113.0/24:8443",), "'203.0.113.0/24:8443'"),
    (("[2001:db9::/32]:443",), "'[2001:db9::/32]:443'"),
    (("pypi.org:443", "x.test:443"), "'x.test:443'"),  # every entry must be covered
])
def test_uncovered_requests_are_refused(allow: tuple[str, ...], shown: str | None) -> None:
    why = untrusted_refusal("block", allow, CEILING)
    assert why is not None
    if shown is not None:
        assert f"egress.allow {shown} is not covered" in why
        assert "settings egress_untrusted_allow" in why


def test_audit_mode_is_refused_for_untrusted_jobs() -> None:
    why = untrusted_refusal("audit", (), CEILING)
    assert why is not None and "mode audit" in why and "egress_untrusted_allow" in why


def test_no_network_is_always_fine() -> None:
    assert untrusted_refusal("none", (), ()) is None
    assert untrusted_refusal("block", (), ()) is None


def test_an_empty_ceiling_refuses_every_destination() -> None:
    why = untrusted_refusal("block", ("pypi.org:443",), ())
    assert why is not None and "egress_untrusted_allow is empty" in why


def test_internal_ranges_stay_refused_even_if_the_operator_lists_them() -> None:
    """The untrusted ceiling is not the internal list: a spec still cannot name 10/8."""
    why = untrusted_refusal("block", ("10.1.0.0/16:443",), ("10.0.0.0/8:443",))
    assert why is not None and "only the operator can open internal destinations" in why


def test_job_chosen_text_is_cut_and_escaped() -> None:
    why = untrusted_refusal("block", ("a" * 500 + ".test:443",), CEILING)
    assert why is not None and len(why) < 400
    why = untrusted_refusal("block", ("x\x1b[2J.test:443",), CEILING)
    assert why is not None and "\x1b" not in why


def test_an_invalid_operator_list_is_named() -> None:
    why = untrusted_refusal("block", ("pypi.org:443",), ("not a rule",))
    assert why is not None and "the operator's settings egress_untrusted_allow is invalid" in why


@pytest.mark.parametrize("rule, by, hit", [
    ("a.example.com:443", "*.example.com:443", True),
    ("*.a.example.com:443", "*.example.com:443", True),
    ("*.example.com:443", "*.example.com:443", True),
    ("*.example.com:443", "a.example.com:443", False),
    ("example.com:443", "*.example.com:443", False),
    ("203.0.113.0/24:443", "203.0.113.0/25:443", False),
    ("203.0.113.0/24:443", "[2001:db8::/32]:443", False),
    ("a.example.com:443", "203.0.113.0/24:443", False),
])
def test_covered(rule: str, by: str, hit: bool) -> None:
    assert covered(parse_rule(rule), parse_rule(by, operator=True)) is hit


def test_the_runner_narrows_what_admission_would_refuse() -> None:
    mode, allow, notes = untrusted_ceiling("audit", ("pypi.org:443", "evil.example:443"),
                                           CEILING)
    assert (mode, allow) == ("block", ("pypi.org:443",))
    assert len(notes) == 2 and "'evil.example:443' dropped" in notes[1]
    assert untrusted_ceiling("block", ("pypi.org:443",), ("bad entry",))[1] == ()
