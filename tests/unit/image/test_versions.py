"""dpkg's version order, checked against ``dpkg --compare-versions`` on this host: epochs,
tildes, binNMUs, letters against digits and symbols, leading zeros, missing revisions."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.image.versions import MAX_VERSION, compare, valid_version

DPKG = shutil.which("dpkg")


def _dpkg(a: str, b: str) -> int:
    """-1, 0 or 1 as dpkg orders ``a`` and ``b``."""
    assert DPKG is not None, "dpkg is missing (Debian's dpkg package)"
    for relation, answer in (("lt", -1), ("eq", 0)):
        if subprocess.run([DPKG, "--compare-versions", a, relation, b],
                          stderr=subprocess.DEVNULL).returncode == 0:
            return answer
    return 1


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


@pytest.mark.parametrize(("a", "b"), [
    ("1.0~rc1", "1.0"), ("1.0~rc1", "1.0~rc2"), ("1.0~~", "1.0~"), ("1.0~", "1.0"),
    ("1:1.0", "2.0"), ("0:2.0", "2.0"), ("1.2-3", "1.2-3+b1"), ("1.2-3+b1", "1.2-3+deb12u1"),
    ("2.36-9+deb12u3", "2.36-9+deb12u10"), ("1.0a", "1.0+"), ("1.0", "1.0.0"), ("1.0", "1.0a"),
    ("1.0", "1.0-0"), ("1.0-0", "1.0-1"), ("00", "0"), ("1.01", "1.1"), ("0", "0~"),
    ("1.0-1", "1.0-1~bpo12+1"), ("2.38.1-5+deb12u3", "1:2.38.1-5+deb12u1"),
    ("1.2.13.dfsg-1", "1:1.2.13.dfsg-1"), ("9", "10"), ("1a", "1."), ("1.0+dfsg", "1.0"),
])
def test_known_orders_agree_with_dpkg(a: str, b: str) -> None:
    assert _sign(compare(a, b)) == _dpkg(a, b), (a, b)
    assert _sign(compare(b, a)) == -_dpkg(a, b), (b, a)


def _versions() -> st.SearchStrategy[str]:
    """Versions as Debian writes them: an upstream version that may hold a colon (after an
    epoch) or a hyphen (before a revision)."""
    digits = st.text("0123456789", min_size=1, max_size=3)
    upstream_tail = st.text("0123456789abz.+~-:", max_size=6)
    revision = st.text("0123456789bu.+~", min_size=1, max_size=5).filter(
        lambda r: r[0].isalnum())

    def build(epoch: str | None, head: str, tail: str, rev: str | None) -> str:
        if epoch is None:
            tail = tail.replace(":", ".")
        if rev is None:
            tail = tail.replace("-", "+")
        return (f"{epoch}:" if epoch else "") + head + tail + (f"-{rev}" if rev else "")

    return st.builds(build, st.one_of(st.none(), digits), digits, upstream_tail,
                     st.one_of(st.none(), revision))


@settings(max_examples=300)
@given(_versions(), _versions())
def test_any_two_versions_are_ordered_as_dpkg_orders_them(a: str, b: str) -> None:
    assert _sign(compare(a, b)) == _dpkg(a, b), (a, b)


@settings(max_examples=100)
@given(_versions())
def test_a_binnmu_and_a_security_update_sort_after_their_version(v: str) -> None:
    base = v if "-" in v else f"{v}-1"
    assert compare(f"{base}+b1", base) > 0
    assert compare(f"{base}+deb12u1", f"{base}+b1") > 0
    assert compare(f"{base}~rc1", base) < 0


@pytest.mark.parametrize("text", ["", "a:1.0", "1.0-", "-1", "1:", "1.0 beta", "1.0_1",
                                  "x" * (MAX_VERSION + 1), "1." + "9" * 5000, "1.0-é",
                                  "1:2:3-", "1.0-1-"])
def test_what_is_not_a_debian_version_is_refused(text: str) -> None:
    assert not valid_version(text)
    with pytest.raises(ValueError):
        compare(text, "1.0")
