"""Vulnerability data in the OSV format (https://ossf.github.io/osv-schema/), as the operator
points at it: one JSON file (a record or a list of records), a directory of ``*.json``
records, or a zip of them (as OSV publishes an ecosystem: ``Debian/all.zip``).

Only what matches Debian packages is kept: the ``affected`` entries whose ecosystem is
``Debian`` or ``Debian:N``, indexed by ``(ecosystem, source package name)`` (Debian's
advisories name source packages). The data comes from outside: every file or zip member is
read within a bound (never by the size a zip header claims), records and the whole are
counted and bounded, and JSON that does not parse, or nests too deeply, stops the load with
an error naming the file. A record that parses but does not have OSV's shape where stockade
needs it (a non-string id, a range without events) is skipped and counted as malformed;
records of other ecosystems and withdrawn ones are skipped and counted as ignored.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from stockade.errors import ConfigError

MAX_RECORD_BYTES = 16 * 1024 * 1024  # one file of a directory or member of a zip
MAX_FILE_BYTES = 512 * 1024 * 1024  # a single JSON file holding every record
MAX_TOTAL_BYTES = 4 * 1024 * 1024 * 1024
MAX_RECORDS = 2_000_000
MAX_LIST = 10_000  # aliases, affected entries, ranges, events, versions of one record
MAX_TEXT = 256
HINT = ("point vulnerability_data (or --vulns) at an OSV JSON file, a directory of OSV "
        "records or a zip of them, such as OSV's Debian/all.zip")
_DEBIAN = re.compile(r"Debian(:[0-9]{1,4})?")
_EVENTS = ("introduced", "fixed", "last_affected", "limit")
_CVSS = ("CVSS_V2", "CVSS_V3", "CVSS_V4")


class VulnerabilityDataError(ConfigError):
    """The vulnerability data cannot be read (missing, not JSON, over a bound)."""


class Advisory(NamedTuple):
    """One OSV record's word on one Debian source package."""

    id: str
    aliases: tuple[str, ...]
    ecosystem: str  # Debian or Debian:12
    package: str  # the source package
    ranges: tuple[tuple[tuple[str, str], ...], ...]  # ECOSYSTEM ranges: (event, version)s
    versions: frozenset[str]  # versions listed as affected
    urgency: str  # Debian's (ecosystem_specific.urgency), lower case
    severity: str  # database_specific.severity, upper case
    cvss: tuple[str, ...]  # CVSS vectors (v2, v3.x, v4.0)


class VulnerabilityData(NamedTuple):
    """The Debian advisories of a data set, by ``(ecosystem, source package)``."""

    advisories: Mapping[tuple[str, str], tuple[Advisory, ...]]
    records: int  # records read
    ignored: int  # other ecosystems, withdrawn
    malformed: int  # records or entries without OSV's shape


def load(path: str) -> VulnerabilityData:
    """The Debian advisories in the OSV data at ``path`` (see the module docstring)."""
    found: dict[tuple[str, str], list[Advisory]] = {}
    counts = {"records": 0, "ignored": 0, "malformed": 0}
    for name, raw in _documents(path):
        for record in _records(raw, name):
            counts["records"] += 1
            if counts["records"] > MAX_RECORDS:
                raise VulnerabilityDataError(f"{path} holds more than {MAX_RECORDS} records",
                                             hint=HINT)
            outcome = _add(found, record)
            if outcome:
                counts[outcome] += 1
    return VulnerabilityData({k: tuple(v) for k, v in found.items()}, counts["records"],
                             counts["ignored"], counts["malformed"])


def _documents(path: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each JSON document at ``path``."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise VulnerabilityDataError(f"vulnerability data {path}: {e.strerror}",
                                     hint=HINT) from None
    if stat.S_ISDIR(st.st_mode):
        yield from _directory(Path(path))
    elif stat.S_ISREG(st.st_mode) and zipfile.is_zipfile(path):
        yield from _zip(path)
    elif stat.S_ISREG(st.st_mode):
        yield path, _read(Path(path), MAX_FILE_BYTES)
    else:
        raise VulnerabilityDataError(f"vulnerability data {path} is neither a file nor a "
                                     "directory", hint=HINT)


def _directory(root: Path) -> Iterator[tuple[str, bytes]]:
    total = 0
    try:
        names = sorted(e.name for e in os.scandir(root)
                       if e.name.endswith(".json") and e.is_file())
    except OSError as e:
        raise VulnerabilityDataError(f"vulnerability data {root}: {e.strerror}",
                                     hint=HINT) from None
    for name in names:
        raw = _read(root / name, MAX_RECORD_BYTES)
        total += len(raw)
        if total > MAX_TOTAL_BYTES:
            raise VulnerabilityDataError(f"{root} holds more than {MAX_TOTAL_BYTES} bytes of "
                                         "records", hint=HINT)
        yield str(root / name), raw


def _zip(path: str) -> Iterator[tuple[str, bytes]]:
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist()
                       if not m.is_dir() and m.filename.endswith(".json")]
            if len(members) > MAX_RECORDS:
                raise VulnerabilityDataError(f"{path} holds more than {MAX_RECORDS} "
                                             "records", hint=HINT)
            for member in members:
                with archive.open(member) as f:
                    raw = f.read(MAX_RECORD_BYTES + 1)  # (not by the size it claims)
                where = f"{path}:{member.filename[:200]!r}"
                if len(raw) > MAX_RECORD_BYTES:
                    raise VulnerabilityDataError(f"{where} is larger than "
                                                 f"{MAX_RECORD_BYTES} bytes", hint=HINT)
                total += len(raw)
                if total > MAX_TOTAL_BYTES:
                    raise VulnerabilityDataError(f"{path} unpacks to more than "
                                                 f"{MAX_TOTAL_BYTES} bytes", hint=HINT)
                yield where, raw
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            ValueError) as e:  # (a corrupt member, an unknown compression or encryption)
        raise VulnerabilityDataError(f"{path} is not a readable zip: {str(e)[:200]}",
                                     hint=HINT) from None
    except OSError as e:
        raise VulnerabilityDataError(f"{path}: {e.strerror or e}", hint=HINT) from None


def _read(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise VulnerabilityDataError(f"vulnerability data {path}: {e.strerror}",
                                     hint=HINT) from None
    if len(raw) > limit:
        raise VulnerabilityDataError(f"{path} is larger than {limit} bytes", hint=HINT)
    return raw


def _records(raw: bytes, name: str) -> list[Any]:
    """The records of one document (an object, or a list of them)."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise VulnerabilityDataError(f"{name} nests too deeply", hint=HINT) from None
    except ValueError:  # (invalid UTF-8 or JSON, a number with too many digits)
        raise VulnerabilityDataError(f"{name} is not JSON", hint=HINT) from None
    return doc if isinstance(doc, list) else [doc]


def _add(found: dict[tuple[str, str], list[Advisory]], record: Any) -> str:
    """Index the Debian advisories of ``record``; what it was if not one (``ignored``,
    ``malformed``), else an empty string."""
    if not isinstance(record, dict) or not _text(record.get("id")):
        return "malformed"
    affected = record.get("affected")
    if record.get("withdrawn") or not isinstance(affected, list):
        return "ignored"
    advisories = []
    for entry in affected[:MAX_LIST]:
        package = entry.get("package") if isinstance(entry, dict) else None
        if not isinstance(package, dict) or not isinstance(package.get("ecosystem"), str) \
                or not _DEBIAN.fullmatch(package["ecosystem"]):
            continue
        advisory = _advisory(record, entry, package)
        if advisory is None:
            return "malformed"
        advisories.append(advisory)
    if not advisories:
        return "ignored"
    for advisory in advisories:
        found.setdefault((advisory.ecosystem, advisory.package), []).append(advisory)
    return ""


def _advisory(record: dict[str, Any], entry: dict[str, Any], package: dict[str, Any]
              ) -> Advisory | None:
    name = package.get("name")
    ranges = _ranges(entry.get("ranges", []))
    versions = entry.get("versions", [])
    if not isinstance(name, str) or not _text(name) or ranges is None or not _texts(versions):
        return None
    aliases = [a for a in (*_list(record.get("aliases")), *_list(record.get("upstream")))
               if _text(a) and a != record["id"]]
    return Advisory(record["id"], tuple(dict.fromkeys(aliases)), package["ecosystem"], name,
                    ranges, frozenset(versions), _field(entry, "ecosystem_specific",
                                                        "urgency").lower(),
                    (_field(entry, "database_specific", "severity")
                     or _field(record, "database_specific", "severity")).upper(),
                    (*_cvss(entry.get("severity")), *_cvss(record.get("severity"))))


def _ranges(ranges: Any) -> tuple[tuple[tuple[str, str], ...], ...] | None:
    """The ECOSYSTEM ranges as ``(event, version)`` tuples (None if malformed)."""
    if not isinstance(ranges, list) or len(ranges) > MAX_LIST:
        return None
    found = []
    for r in ranges:
        if not isinstance(r, dict) or not isinstance(r.get("events"), list) \
                or len(r["events"]) > MAX_LIST:
            return None
        if r.get("type") != "ECOSYSTEM":
            continue  # (GIT ranges name commits: nothing a package version can match)
        events = []
        for event in r["events"]:
            kinds = [k for k in _EVENTS if isinstance(event, dict) and k in event]
            if len(kinds) != 1 or not _text(event[kinds[0]]):
                return None
            events.append((kinds[0], str(event[kinds[0]])))
        if not events:
            return None
        found.append(tuple(events))
    return tuple(found)


def _cvss(severity: Any) -> list[str]:
    return [s["score"] for s in _list(severity)
            if isinstance(s, dict) and s.get("type") in _CVSS and _text(s.get("score"))]


def _field(doc: dict[str, Any], section: str, key: str) -> str:
    value = doc.get(section)
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, str) and _text(found) else ""


def _list(value: Any) -> list[Any]:
    return value[:MAX_LIST] if isinstance(value, list) else []


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()


def _texts(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_LIST and all(_text(v) for v in value)


def to_json(data: VulnerabilityData) -> dict[str, Any]:
    """``data`` as JSON (stored so that another process need not read the records again)."""
    return {"records": data.records, "ignored": data.ignored, "malformed": data.malformed,
            "advisories": [[a.id, list(a.aliases), a.ecosystem, a.package,
                            [[list(e) for e in r] for r in a.ranges], sorted(a.versions),
                            a.urgency, a.severity, list(a.cvss)]
                           for advisories in data.advisories.values() for a in advisories]}


def from_json(doc: dict[str, Any]) -> VulnerabilityData:
    """The data :func:`to_json` wrote (KeyError, TypeError or ValueError if it is not)."""
    found: dict[tuple[str, str], list[Advisory]] = {}
    for i, aliases, ecosystem, package, ranges, versions, urgency, severity, cvss \
            in doc["advisories"]:
        advisory = Advisory(str(i), tuple(aliases), str(ecosystem), str(package),
                            tuple(tuple((str(k), str(v)) for k, v in r) for r in ranges),
                            frozenset(versions), str(urgency), str(severity), tuple(cvss))
        found.setdefault((advisory.ecosystem, advisory.package), []).append(advisory)
    return VulnerabilityData({k: tuple(v) for k, v in found.items()}, int(doc["records"]),
                             int(doc["ignored"]), int(doc["malformed"]))
