"""Side-by-side measurement the benchmarks share: interleaved runs, medians, one RESULT line;
and the removal of a benchmark installation's runtime directory."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def compare(title: str, subject: Callable[[], None], baseline: Callable[[], None], n: int,
            against: str, *, key: str = "ratio", warm: int = 5, **figures: Any) -> None:
    """Interleave ``n`` runs of each (after ``warm`` of each, to warm caches), so both see
    the same machine load; print the medians and their ratio, and a RESULT line holding
    ``figures`` and the ratio under ``key``."""
    for _ in range(warm):
        subject()
        baseline()
    a, b = [], []
    for _ in range(n):
        t = time.perf_counter()
        subject()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        baseline()
        b.append(time.perf_counter() - t)
    ma, mb = statistics.median(a), statistics.median(b)
    shown = f"{title} [{figures['backend']}]" if "backend" in figures else title
    print(f"{shown}: median {ma * 1000:.2f} ms vs {against} {mb * 1000:.2f} ms "
          f"-> {key} {ma / mb:.2f}  (n={n}, p90 {sorted(a)[int(n * 0.9)] * 1000:.2f} ms)")
    print("RESULT " + json.dumps({"config": title, "against": against, "n": n, **figures,
                                  "median_ms": round(ma * 1000, 2),
                                  "baseline_median_ms": round(mb * 1000, 2),
                                  key: round(ma / mb, 3)}), flush=True)


def remove_installation(home: Path) -> None:
    """The runtime directory the benchmark's own installation (state directory ``home``)
    made."""
    from stockade.config import load_settings

    try:
        installation = (home / "installation-id").read_text().strip()
    except OSError:
        return
    if installation.isalnum():
        shutil.rmtree(Path(load_settings({"STOCKADE_HOME": str(home)}).runtime_dir)
                      / installation, ignore_errors=True)
