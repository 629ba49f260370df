"""``stockade validate FILE...``: check job specs without running them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "check job specs without running them"
DESCRIPTION = """\
Validate each job spec FILE the way stockade run would (exit 0 if all are valid, 2 otherwise,
with every problem and its fix), including this runner's resource ceilings (max_cpus,
max_memory_bytes, max_pids, max_tmp_bytes, max_workspace_bytes, max_timeout_s). With --json,
print each valid spec with all defaults filled in. A validated spec is cached, so the next
stockade run of it starts faster."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``FILE... [--json]``."""
    p.add_argument("files", metavar="FILE", type=Path, nargs="+", help="job specs (YAML)")
    p.add_argument("--json", action="store_true", help="print the normalised specs as JSON")


def main(args: argparse.Namespace) -> int:
    """Validate every file; report all problems, not just the first file's."""
    from stockade.config import ensure_home, load_settings
    from stockade.errors import SpecError
    from stockade.spec import ceilings, load_spec

    settings = load_settings()
    ensure_home(settings)
    failed = False
    for path in args.files:
        try:
            job = load_spec(path, settings.cache_dir / "specs")
            ceilings.check(job, settings, source=str(path))
        except SpecError as e:
            failed = True
            sys.stderr.write(f"stockade: {e.diagnostics()}\n")
            continue
        if args.json:
            sys.stdout.write(json.dumps(json.loads(job.to_json())) + "\n")
        else:
            print(f"{path}: valid ({job.name}, {len(job.steps)} steps)")
    return 2 if failed else 0
