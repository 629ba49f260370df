"""OSV records shaped as osv.dev publishes Debian's (``DEBIAN-CVE-*`` from the security
tracker, ``DSA-*`` advisories), written as the operator would point at them: one record per
file in a directory, or a zip of them."""

from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CRITICAL = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8
HIGH = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"  # 7.5
MEDIUM = "CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:U/C:L/I:L/A:N"  # 5.4
LOW = "CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N"  # 1.8


def record(cve: str, package: str, fixed: str | None = None, ecosystem: str = "Debian:12",
           vector: str | None = None, urgency: str = "not yet assigned",
           introduced: str = "0", **extra: Any) -> dict[str, Any]:
    """A ``DEBIAN-CVE-...`` record: ``package`` (a source package) affected from
    ``introduced`` until ``fixed`` (None: not fixed yet)."""
    events: list[dict[str, str]] = [{"introduced": introduced}]
    if fixed is not None:
        events.append({"fixed": fixed})
    doc: dict[str, Any] = {
        "id": f"DEBIAN-{cve}", "upstream": [cve], "modified": "2024-06-01T00:00:00Z",
        "details": f"{cve} in {package}", "schema_version": "1.6.0",
        "affected": [{"package": {"name": package, "ecosystem": ecosystem},
                      "ranges": [{"type": "ECOSYSTEM", "events": events}],
                      "ecosystem_specific": {"urgency": urgency}}]}
    if vector:
        doc["severity"] = [{"type": "CVSS_V3", "score": vector}]
    doc.update(extra)
    return doc


def write_dir(directory: Path, records: Iterable[Any]) -> Path:
    """One ``<n>.json`` per record in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for n, doc in enumerate(records):
        (directory / f"{n:06d}.json").write_text(json.dumps(doc))
    return directory


def write_zip(path: Path, records: Iterable[Any]) -> Path:
    """A zip of one ``<n>.json`` per record (as OSV's ``all.zip``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, doc in enumerate(records):
            z.writestr(f"{n:06d}.json", json.dumps(doc))
    return path


def realistic(sources: Sequence[tuple[str, str]], count: int, seed: int = 1
              ) -> list[dict[str, Any]]:
    """``count`` records like Debian 12's: a third on the installed ``(source, version)``
    pairs (fixed below, at or above the installed version, or not fixed), the rest on other
    packages; CVSS vectors and urgencies mixed, a DSA for every twentieth."""
    rng = random.Random(seed)
    vectors = (CRITICAL, HIGH, MEDIUM, LOW, None)
    urgencies = ("not yet assigned", "unimportant", "low", "medium", "high")
    records = []
    for n in range(count):
        cve = f"CVE-{2015 + n % 10}-{10000 + n}"
        if n % 3 == 0 and sources:
            package, version = sources[rng.randrange(len(sources))]
            fixed = rng.choice((None, f"{version}+deb12u9", "0.0.1-1", version))
        else:
            package, fixed = f"other-package-{n % 5000}", "1.0-1"
        records.append(record(cve, package, fixed, vector=rng.choice(vectors),
                              urgency=rng.choice(urgencies)))
        if n % 20 == 0:
            records.append({"id": f"DSA-{5000 + n}-1", "aliases": [cve],
                            "affected": [{"package": {"name": package,
                                                      "ecosystem": "Debian:12"},
                                          "ranges": [{"type": "ECOSYSTEM", "events": [
                                              {"introduced": "0"},
                                              {"fixed": fixed or "99:1"}]}]}]})
    return records
