"""Matching an image's packages against OSV advisories: findings and counts per severity.

A source package at its installed version is affected by an advisory of its distribution's
ecosystems (``Debian:12`` and ``Debian`` for a Debian 12 image) when the version is listed in
its ``versions``, or falls in one of its ECOSYSTEM ranges, read by OSV's rule in dpkg's
order: events sorted by version (``introduced: "0"`` first), the version is affected after
an ``introduced`` at or below it, until a ``fixed`` at or below it, or a ``last_affected``
below it. One finding per advisory and source package; an advisory whose aliases are all
named by other findings of the package (a DSA that lists the CVEs Debian also publishes one
by one) is folded into them (its id added to their aliases, its severity taken where it is
worse) rather than counted again.

Severity, in this order: Debian's urgency ``unimportant`` (Debian's word that the issue does
not matter for its package) is ``low``; else the highest CVSS base score of the advisory's
vectors (v3.x and v4.0, else v2), rated as CVSS does (critical from 9.0, high from 7.0,
medium from 4.0); else ``database_specific.severity`` (CRITICAL, HIGH, MODERATE or MEDIUM,
LOW); else Debian's urgency ``high``, ``medium`` or ``low``; else ``unknown``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import NamedTuple

from stockade.image.osv import Advisory, VulnerabilityData
from stockade.image.packages import ImageContents, Package, UnreadablePackages
from stockade.image.versions import VersionKey, compare_keys, version_key

MAX_EVALUATIONS = 1_000_000  # (source version, advisory) pairs one scan evaluates


class Severity(StrEnum):
    """How bad a finding is, lowest first."""

    UNKNOWN = "unknown"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """Its place in the order (unknown 0 ... critical 4)."""
        return list(Severity).index(self)


class Finding(NamedTuple):
    """One advisory that affects one installed source package."""

    id: str
    aliases: tuple[str, ...]
    package: str  # the source package
    binaries: tuple[str, ...]  # its installed binary packages
    installed: str  # the source version installed
    fixed: str | None  # the version that fixes it, if the advisory names one
    severity: Severity


class ScanReport(NamedTuple):
    """The findings of one image (most severe first) and their counts per severity."""

    findings: tuple[Finding, ...]
    counts: dict[str, int]  # every severity, zeros included
    packages: int  # installed binary packages
    ecosystem: str  # the OSV ecosystem matched (empty: the distribution is unknown)
    malformed: int  # records of the data without OSV's shape, and advisories of these
    # packages whose versions do not parse

    def at_least(self, threshold: Severity) -> int:
        """How many findings are at ``threshold`` or above."""
        return sum(n for s, n in self.counts.items() if Severity(s).rank >= threshold.rank)


def scan(contents: ImageContents, data: VulnerabilityData) -> ScanReport:
    """The findings of the data's advisories on the image's packages (UnreadablePackages if
    the image lists more source versions than :data:`MAX_EVALUATIONS` allows matching)."""
    ecosystems = contents.distribution.osv_ecosystems
    sources = _sources(contents.packages)
    work = sum(len(data.advisories.get((e, source), ())) for source, _ in sources
               for e in ecosystems)
    if work > MAX_EVALUATIONS:  # (an image listing a package at 100,000 versions)
        raise UnreadablePackages(f"the image's {len(sources)} source package versions have "
                                 f"{work} advisories to evaluate, more than the "
                                 f"{MAX_EVALUATIONS} a scan evaluates")
    findings: list[Finding] = []
    malformed = data.malformed
    for (source, version), binaries in sources.items():
        found, bad = _match_source(source, version, binaries, ecosystems, data)
        findings += found
        malformed += bad
    findings.sort(key=lambda f: (-f.severity.rank, f.package, f.id))
    counts = {s.value: 0 for s in reversed(Severity)}
    for finding in findings:
        counts[finding.severity.value] += 1
    return ScanReport(tuple(findings), counts, len(contents.packages),
                      ecosystems[0] if ecosystems else "", malformed)


def _sources(packages: Sequence[Package]) -> dict[tuple[str, str], tuple[str, ...]]:
    """The installed source packages at their versions, with their binaries."""
    found: dict[tuple[str, str], list[str]] = {}
    for p in packages:
        found.setdefault((p.source, p.source_version), []).append(p.name)
    return {k: tuple(sorted(set(v))) for k, v in sorted(found.items())}


def _match_source(source: str, version: str, binaries: tuple[str, ...],
                  ecosystems: Iterable[str], data: VulnerabilityData
                  ) -> tuple[list[Finding], int]:
    found: dict[str, Finding] = {}
    malformed = 0
    for ecosystem in ecosystems:
        for advisory in data.advisories.get((ecosystem, source), ()):
            try:
                hit, fixed = affects(advisory, version)
            except ValueError:
                malformed += 1
                continue
            if hit and advisory.id not in found:
                found[advisory.id] = Finding(advisory.id, advisory.aliases, source, binaries,
                                             version, fixed, severity(advisory))
    return _fold(list(found.values())), malformed


def affects(advisory: Advisory, version: str) -> tuple[bool, str | None]:
    """Whether ``advisory`` affects ``version``, and the fixed version of the range that
    holds it (ValueError if a version of the advisory does not parse)."""
    fixed_at: str | None = None
    hit = version in advisory.versions
    for events in advisory.ranges:
        affected, fixed = _in_range(events, version)
        if affected:
            hit, fixed_at = True, fixed_at or fixed
    return hit, fixed_at


def _in_range(events: Sequence[tuple[str, str]], version: str) -> tuple[bool, str | None]:
    """OSV's evaluation of one ECOSYSTEM range (see the module docstring)."""
    installed = version_key(version)
    keyed = sorted(((kind, v, None if kind == "introduced" and v == "0" else version_key(v))
                    for kind, v in events), key=functools.cmp_to_key(_by_version))
    affected = False
    for kind, _, key in keyed:
        if key is None:  # introduced "0": from the first version on
            affected = True
        elif kind == "introduced":
            affected = affected or compare_keys(installed, key) >= 0
        elif kind == "last_affected":
            affected = affected and compare_keys(installed, key) <= 0
        else:  # fixed, limit
            affected = affected and compare_keys(installed, key) < 0
    fixed = next((v for kind, v, key in keyed if kind == "fixed" and key is not None
                  and compare_keys(key, installed) > 0), None) if affected else None
    return affected, fixed


def _by_version(a: tuple[str, str, VersionKey | None], b: tuple[str, str, VersionKey | None]
                ) -> int:
    if a[2] is None or b[2] is None:  # introduced "0": before everything
        return (a[2] is not None) - (b[2] is not None)
    return compare_keys(a[2], b[2])


def _fold(findings: list[Finding]) -> list[Finding]:
    """Fold the advisories whose aliases other findings already name (see the module
    docstring); the most specific (fewest aliases) are kept first."""
    kept: list[Finding] = []
    named: set[str] = set()
    for finding in sorted(findings, key=lambda f: (len(f.aliases), f.id)):
        if finding.aliases and set(finding.aliases) <= named:
            # (the findings it names keep its severity if it is worse: a critical advisory
            # folded into a low one must still count as critical)
            kept = [k._replace(aliases=(*k.aliases, finding.id),
                               severity=max(k.severity, finding.severity,
                                            key=lambda s: s.rank))
                    if set(finding.aliases) & {k.id, *k.aliases} else k for k in kept]
            continue
        kept.append(finding)
        named |= {finding.id, *finding.aliases}
    return kept


_TEXT = {"CRITICAL": Severity.CRITICAL, "HIGH": Severity.HIGH, "MODERATE": Severity.MEDIUM,
         "MEDIUM": Severity.MEDIUM, "LOW": Severity.LOW}
_URGENCY = {"high": Severity.HIGH, "medium": Severity.MEDIUM, "low": Severity.LOW}


def severity(advisory: Advisory) -> Severity:
    """The severity of an advisory (see the module docstring for the order of sources)."""
    urgency = advisory.urgency.rstrip("* ")
    if urgency == "unimportant":
        return Severity.LOW
    scores = [s for s in (cvss_score(v) for v in advisory.cvss) if s is not None]
    if scores:
        modern = [score for version, score in scores if version >= 3]
        return _rating(max(modern or [score for _, score in scores]))
    if advisory.severity in _TEXT:
        return _TEXT[advisory.severity]
    return _URGENCY.get(urgency, Severity.UNKNOWN)


def _rating(score: float) -> Severity:
    if score >= 9.0:
        return Severity.CRITICAL
    if score >= 7.0:
        return Severity.HIGH
    if score >= 4.0:
        return Severity.MEDIUM
    return Severity.LOW


@functools.lru_cache(maxsize=4096)
def cvss_score(vector: str) -> tuple[int, float] | None:
    """``(CVSS major version, base score)`` of a vector (None if it does not parse)."""
    from cvss import CVSS2, CVSS3, CVSS4, CVSSError

    try:
        if vector.startswith("CVSS:4.0/"):
            return 4, float(CVSS4(vector).base_score)
        if vector.startswith(("CVSS:3.0/", "CVSS:3.1/")):
            return 3, float(CVSS3(vector).base_score)
        return 2, float(CVSS2(vector).base_score)
    except (CVSSError, ValueError, KeyError, TypeError, ArithmeticError):
        return None
