"""``stockade run FILE``: one job, end to end, through the embedded control plane."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.control import ControlService

HELP = "run one job locally in a hardened sandbox"
DESCRIPTION = """\
Run the job spec FILE once, locally: it is admitted, queued, claimed by an in-process runner
and executed in a fresh sandbox (sandbox_backend: bwrap by default); the workspace
(--workspace, default: the current directory) is copied into the sandbox, never mounted,
without the paths that .stockadeignore at its root or --exclude name (gitignore syntax); a
workspace larger than the job's resources.workspace is refused before the job is submitted.
Live logs go to stderr; with --json one JSON object with the result is printed on stdout at
the end.

Exit codes: 0 succeeded, 1 failed (script, timeout, oom, ...), 2 invalid spec or usage,
3 denied by policy, 4 infrastructure error."""

EXIT_BY_STATUS = {"succeeded": 0, "failed": 1, "denied": 3, "error": 4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``FILE [--workspace DIR] [--json]``."""
    p.add_argument("file", metavar="FILE", type=Path, help="the job spec (YAML)")
    p.add_argument("--workspace", metavar="DIR", type=Path, default=None,
                   help="directory copied to /workspace (default: current directory)")
    p.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help="leave paths matching PATTERN (gitignore syntax) out of the workspace "
                   "copy, after those of .stockadeignore; repeatable")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--trust", default="trusted", choices=("untrusted", "trusted", "protected"),
                   help="how far the job's origin is trusted (untrusted: e.g. a fork pull "
                   "request; never receives secrets). Default: trusted")
    p.add_argument("--ref", default="local", metavar="REF",
                   help="the source reference the job runs (in its identity token's sub)")


def _cancel_asked(control: ControlService, job_id: str) -> bool:
    """Whether ``stockade cancel`` asked the job to stop."""
    job = control.job(job_id)
    return job is not None and job.cancel_requested_at is not None


def main(args: argparse.Namespace) -> int:
    """Run the job and report it."""
    from stockade import liveness
    from stockade.cli.context import open_control, recover_lost
    from stockade.errors import UsageError
    from stockade.ids import new_runner_id
    from stockade.runner import Runner
    from stockade.sandbox import get_backend
    from stockade.sandbox.interface import WorkspaceSource
    from stockade.sandbox.workspace import check_workspace
    from stockade.spec import ceilings, load_spec

    # recover_lost below, with the backend
    settings, control = open_control(recover=False, local_runner=True)
    spec = load_spec(args.file, settings.cache_dir / "specs")
    ceilings.check(spec, settings, source=str(args.file))
    workspace = (args.workspace or Path.cwd()).absolute()
    if not workspace.is_dir():
        raise UsageError(f"workspace {workspace} is not a directory",
                         hint="pass --workspace DIR with an existing directory")
    workspace = WorkspaceSource(workspace, tuple(args.exclude))
    check_workspace(workspace, spec.resources.workspace, settings.max_workspace_bytes)
    backend = get_backend(settings.sandbox_backend, settings)
    backend.warm()
    recover_lost(settings, control, backend)
    runner_id = new_runner_id(f"local-{os.uname().nodename}")
    # held from before the job exists until its result is committed: if this process dies
    # at any point, the next command sees the lock free and fails the job at once
    lock = liveness.hold(settings.home, runner_id)
    recorded = False
    try:
        job = control.submit(spec, trust=args.trust, ref=args.ref, runner_id=runner_id)
        if job.status == "queued":
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # cancel, then tear down
            signal.signal(signal.SIGHUP, signal.default_int_handler)
            live = sys.stderr.buffer if sys.stderr is not None else None  # None: stderr closed
            runner = Runner(settings, backend, control, runner_id, live=live,
                            canceled=functools.partial(_cancel_asked, control))
            runner.run_one(workspace, job_id=job.id)
        recorded = True
    finally:
        liveness.release(settings.home, runner_id, lock, recorded)
    view = control.view(job.id)
    assert view is not None
    result = view.result()
    if job.status == "denied":
        sys.stderr.write(f"stockade: job {job.id} denied ({job.failure_reason}): "
                         f"{result.get('message', '')}\n")
    if args.json:
        sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    return EXIT_BY_STATUS.get(result["status"], 4)
