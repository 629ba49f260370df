"""Scanning cached images against the operator's vulnerability data, and the runner's policy.

A scan's report is stored per image (``<cache>/scan/<digest hex>.json``, root's, 0600) with
the signature of the data it used (its path, size and modification time, and those of each
record of a directory): the same image with the same data is read back (one ``stat`` of the
data, one small file), and any change to the data, or to the matching code, scans again. The
data is loaded once per process for a signature (a runner agent keeps it between jobs).

The runner's policy (:func:`check_image`): with ``vulnerability_data`` set, every job on an
image gets the image's counts per severity, and an image with a finding at or above
``image_refuse_severity`` (``critical``, ``high``, ``medium``, ``low``, ``any``; ``none``
refuses nothing) is refused before any step. An image whose package database cannot be
read cannot be shown to be below the threshold: it is refused too (unless ``none``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from stockade.errors import ConfigError
from stockade.image.osv import (
    HINT,
    VulnerabilityData,
    VulnerabilityDataError,
    from_json,
    load,
    to_json,
)
from stockade.image.packages import UnreadablePackages, read_contents
from stockade.image.sbom import digest_hex, store
from stockade.image.vulns import Finding, ScanReport, Severity, scan

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.image.cache import CachedImage

SCANNER = 3  # the matching's version: stored reports of another are made again
THRESHOLDS = ("critical", "high", "medium", "low", "any", "none")
MAX_REPORT_BYTES = 64 * 1024 * 1024
_LOADED: dict[str, VulnerabilityData] = {}  # signature -> data (the last one)


class Verdict(NamedTuple):
    """What the runner's policy says of an image: its counts (None if it could not be
    scanned), a note for the job's log, and why it is refused (None: it may run)."""

    counts: dict[str, int] | None
    note: str
    refusal: str | None


def threshold(setting: str) -> Severity | None:
    """The severity ``image_refuse_severity`` (or ``--fail-on``) names, None for ``none``."""
    if setting not in THRESHOLDS:
        raise ConfigError(f"image_refuse_severity: {setting[:40]!r} is not a severity",
                          hint=f"use one of {', '.join(THRESHOLDS)}")
    if setting == "none":
        return None
    return Severity.UNKNOWN if setting == "any" else Severity(setting)


def check_image(settings: Settings, cache_root: Path, image: CachedImage) -> Verdict | None:
    """The policy's verdict on ``image`` (None when no vulnerability data is configured)."""
    if not settings.vulnerability_data:
        return None
    limit = threshold(settings.image_refuse_severity)
    started = time.monotonic()
    try:
        report, fresh = scan_cached(cache_root, image, settings.vulnerability_data)
    except UnreadablePackages as e:
        why = f"image {image.reference} cannot be scanned: {e.message}"
        return Verdict(None, why, f"{why}; refused (image_refuse_severity "
                                  f"{settings.image_refuse_severity})" if limit else None)
    took = f"scanned in {time.monotonic() - started:.2f} s" if fresh else "scan cached"
    note = f"image vulnerabilities: {summary(report)} ({took})"
    breaching = [f for f in report.findings
                 if limit is not None and f.severity.rank >= limit.rank]
    refusal = None
    if breaching:
        ids = ", ".join(f"{f.id} ({f.package})" for f in breaching[:5])
        more = f" and {len(breaching) - 5} more" if len(breaching) > 5 else ""
        refusal = (f"image {image.reference} has {len(breaching)} finding(s) at or above "
                   f"image_refuse_severity {settings.image_refuse_severity}: {ids}{more}; "
                   "refused")
    return Verdict(report.counts, note, refusal)


def summary(report: ScanReport) -> str:
    """``0 critical, 2 high, ... in N packages (Debian:12)``."""
    counts = ", ".join(f"{n} {s}" for s, n in report.counts.items())
    where = report.ecosystem or "distribution unknown: no advisories apply"
    bad = f"; {report.malformed} malformed records or versions ignored" if report.malformed \
        else ""
    return f"{counts} in {report.packages} packages ({where}{bad})"


def scan_cached(cache_root: Path, image: CachedImage, data_path: str
                ) -> tuple[ScanReport, bool]:
    """The report of ``image`` against the data at ``data_path``: the stored one if made with
    this data, else made now and stored; and whether it was made now."""
    signature = data_signature(data_path)
    path = cache_root / "scan" / f"{digest_hex(image.digest)}.json"
    stored = _stored(path, signature)
    if stored is not None:
        return stored, False
    report = scan(read_contents(image.rootfs), _data(cache_root, data_path, signature))
    doc = {"scanner": SCANNER, "data": signature, "report": report_json(report)}
    store(cache_root, "scan", path.name, json.dumps(doc, sort_keys=True).encode())
    return report, True


def _data(cache_root: Path, path: str, signature: str) -> VulnerabilityData:
    """The data at ``path``: this process's copy, else the index stored for its signature
    (``<cache>/osv/<signature>.json``: the Debian advisories only), else read and indexed."""
    data = _LOADED.get(signature)
    if data is not None:
        return data
    index = cache_root / "osv" / f"{signature}.json"
    try:
        data = from_json(json.loads(index.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        data = None  # (none yet, or torn: made again)
    if data is None:
        data = load(path)
        store(cache_root, "osv", index.name, json.dumps(to_json(data)).encode(),
              keep=lambda name: False)
    _LOADED.clear()
    _LOADED[signature] = data
    return data


def data_signature(path: str) -> str:
    """What identifies the data at ``path`` as it is now (see the module docstring)."""
    digest = hashlib.sha256(f"{SCANNER}\0{os.path.abspath(path)}".encode())
    try:
        st = os.stat(path)
        digest.update(f"\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.name.endswith(".json"):
                        s = entry.stat()
                        digest.update(f"\0{entry.name}\0{s.st_size}\0{s.st_mtime_ns}"
                                      .encode(errors="surrogateescape"))
    except OSError as e:
        raise VulnerabilityDataError(f"vulnerability data {path}: {e.strerror}",
                                     hint=HINT) from None
    return digest.hexdigest()


def _stored(path: Path, signature: str) -> ScanReport | None:
    try:
        with path.open("rb") as f:
            doc = json.loads(f.read(MAX_REPORT_BYTES))
        if doc["scanner"] != SCANNER or doc["data"] != signature:
            return None
        return report_from_json(doc["report"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # (none, or torn: made again)


def report_json(report: ScanReport) -> dict[str, Any]:
    """A report as JSON (``stockade image scan --json`` prints it)."""
    return {"counts": report.counts, "packages": report.packages,
            "ecosystem": report.ecosystem, "malformed": report.malformed,
            "findings": [{"id": f.id, "aliases": list(f.aliases), "package": f.package,
                          "binaries": list(f.binaries), "installed": f.installed,
                          "fixed": f.fixed, "severity": f.severity.value}
                         for f in report.findings]}


def report_from_json(doc: dict[str, Any]) -> ScanReport:
    """The report :func:`report_json` wrote."""
    findings = tuple(Finding(f["id"], tuple(f["aliases"]), f["package"], tuple(f["binaries"]),
                             f["installed"], f["fixed"], Severity(f["severity"]))
                     for f in doc["findings"])
    counts = {s.value: int(doc["counts"][s.value]) for s in reversed(Severity)}  # (in order)
    return ScanReport(findings, counts, int(doc["packages"]), str(doc["ecosystem"]),
                      int(doc["malformed"]))
