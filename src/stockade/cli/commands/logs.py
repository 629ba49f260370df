"""``stockade logs JOB``: the stored log of a job."""

from __future__ import annotations

import argparse
import shutil
import sys

HELP = "print a job's stored log"
DESCRIPTION = "Print the stored (size-capped) log of a job to stdout."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB``."""
    p.add_argument("job", metavar="JOB", help="job id or a unique prefix of it")


def main(args: argparse.Namespace) -> int:
    """Copy the log file to stdout."""
    from stockade.cli.context import open_control, require_job
    from stockade.errors import UsageError

    settings, control = open_control()
    view = require_job(control, args.job)
    path = settings.logs_dir / f"{view.job.id}.log"
    try:
        with path.open("rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer)
    except FileNotFoundError:
        raise UsageError(f"job {view.job.id} has no stored log (status {view.job.status})",
                         hint="only jobs that reached a runner have logs") from None
    return 0
