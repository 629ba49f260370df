"""Image scans: the host's own dpkg database (as an image tree) against OSV records shaped as
Debian 12's (``tests/support/osv.py``: a third on the host's source packages, the rest on
others, one DSA per twenty), as a zip (OSV's ``all.zip``) and as a directory of records.

Per form of the data: ``cold`` (the records read and indexed, nothing stored yet), ``index``
(another process: the stored index of the Debian advisories read instead of the records),
``in-process`` (a runner agent's next new image: the data already loaded), ``cached`` (the same
image again: the stored report read back, what every job after the first pays), and the
baseline ``signature`` (what telling whether the data changed costs). Then ``sbom``: making the
CycloneDX SBOM of the same tree. Each configuration ends with one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stockade.image import scan as scanning
from stockade.image.cache import CachedImage
from stockade.image.packages import read_contents
from stockade.image.sbom import make_sbom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.osv import realistic, write_dir, write_zip

DIGEST = "sha256:" + "ab" * 32


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _form(form: str, data: Path, base: Path, image: CachedImage, packages: int,
          records: int) -> None:
    cache = base / f"cache-{form}"
    (cache / "images").mkdir(parents=True)
    (cache / "images" / f"{DIGEST[7:]}.json").write_text("{}")
    figures: dict[str, Any] = {"records": records, "packages": packages}
    report = None
    for stage in ("cold", "index", "in-process", "cached"):
        if stage in ("cold", "index"):
            scanning._LOADED.clear()
        if stage != "cached":
            (cache / "scan" / f"{DIGEST[7:]}.json").unlink(missing_ok=True)
        took, (report, _) = _timed(lambda: scanning.scan_cached(cache, image, str(data)))
        figures[f"{stage}_s"] = round(took, 3)
    figures["signature_s"] = round(_timed(lambda: scanning.data_signature(str(data)))[0], 4)
    figures["findings"] = len(report.findings) if report else 0
    figures["cached_vs_cold"] = round(figures["cached_s"] / figures["cold_s"], 4)
    print(f"{form:<10} " + " ".join(f"{k}={v}" for k, v in figures.items()))
    print("RESULT " + json.dumps({"benchmark": "image_scan", "config": form, **figures}),
          flush=True)


def main() -> None:
    """Run each configuration and print its RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=40_000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="stockade-bench-scan-"))
    try:
        tree = base / "tree"
        (tree / "var/lib/dpkg").mkdir(parents=True)
        (tree / "etc").mkdir()
        shutil.copy("/var/lib/dpkg/status", tree / "var/lib/dpkg/status")
        shutil.copy("/etc/os-release", tree / "etc/os-release", follow_symlinks=True)
        contents = read_contents(tree)
        sources = sorted({(p.source, p.source_version) for p in contents.packages})
        records = realistic(sources, args.records)
        image = CachedImage(DIGEST, f"registry.example/bench@{DIGEST}", DIGEST, tree, {}, 0,
                            0.0)
        _form("zip", write_zip(base / "all.zip", records), base, image,
              len(contents.packages), len(records))
        _form("directory", write_dir(base / "records", records), base, image,
              len(contents.packages), len(records))
        took, sbom = _timed(lambda: make_sbom(image, contents))
        print("RESULT " + json.dumps({"benchmark": "image_scan", "config": "sbom",
                                      "packages": len(contents.packages),
                                      "sbom_s": round(took, 3), "bytes": len(sbom)}),
              flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
