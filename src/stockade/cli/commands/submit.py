"""``stockade submit FILE``: send a job and its workspace to a stockade server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.cli.remote import add_server_argument

if TYPE_CHECKING:
    from stockade.cli.remote import Remote

HELP = "submit a job (and its workspace) to a stockade server"
DESCRIPTION = """\
stockade submit FILE [--workspace DIR] [--exclude PATTERN]... [--trust T] [--ref REF]
                     [--follow] [--json] [--server URL]

Validates the job spec FILE here, packs the workspace (--workspace, default: the current
directory; without what .stockadeignore and --exclude name, as stockade run copies it) into an
archive, uploads it, and queues the job on the server ($STOCKADE_SERVER or --server, with the
API token in $STOCKADE_TOKEN: a submitter's). The job id is printed on stdout (and a line on
stderr says it was queued); then:

  (neither)  exit 0 as soon as the job is queued
  --follow   stream its live log to stderr, as stockade run does, until it ends
  --json     wait for the end and print the result object of stockade run --json on stdout
             (and only it)

With --follow or --json the exit code is the job's, as for stockade run: 0 succeeded,
1 failed, 3 denied by policy, 4 error; 2 is an invalid spec or usage (nothing submitted).
A job denied at submission exits 3 at once. Interrupting the command does not cancel the job
(stockade cancel JOB does)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``FILE [--workspace DIR] [--exclude P]... [--trust T] [--ref R] [--follow] [--json]``."""
    p.add_argument("file", metavar="FILE", type=Path, help="the job spec (YAML)")
    p.add_argument("--workspace", metavar="DIR", type=Path, default=None,
                   help="directory sent as the job's /workspace (default: current directory)")
    p.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help="leave paths matching PATTERN (gitignore syntax) out of the workspace, "
                   "after those of .stockadeignore; repeatable")
    p.add_argument("--trust", default="trusted", choices=("untrusted", "trusted", "protected"),
                   help="the trust asked for; the server caps it at the token's max trust "
                   "(default: trusted)")
    p.add_argument("--ref", default="local", metavar="REF",
                   help="the source reference the job runs, e.g. refs/heads/main (the token "
                   "must allow it; default: local)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the live log to stderr and wait for the end")
    p.add_argument("--json", action="store_true",
                   help="wait for the end and print the result as JSON on stdout")
    add_server_argument(p, local=False)


def main(args: argparse.Namespace) -> int:
    """Submit, then (if asked) follow."""
    from stockade.cli.commands.run import EXIT_BY_STATUS
    from stockade.cli.remote import connect
    from stockade.errors import UsageError

    remote = connect(args)
    if remote is None:
        raise UsageError("stockade submit sends the job to a server: pass --server URL or set "
                         "STOCKADE_SERVER", hint="to run it here instead: stockade run FILE")
    spec_text, limit = _read_spec(args.file)
    workspace = (args.workspace or Path.cwd()).absolute()
    sha256 = _upload_workspace(remote, workspace, tuple(args.exclude), limit)
    body = {"spec": spec_text, "trust": args.trust, "ref": args.ref,
            "workspace_sha256": sha256}
    job = remote.json("POST", "/api/v1/jobs", "submitter", body)
    job_id = str(job["job_id"])
    if not args.json:
        print(job_id, flush=True)
    if job["status"] == "denied":
        result = _result(remote, job_id)
        sys.stderr.write(f"stockade: job {job_id} denied ({job['failure_reason']}): "
                         f"{_e(result.get('message', ''))}\n")
        if args.json:
            sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
        return 3
    sys.stderr.write(f"stockade: job {job_id} queued at {remote.url} (trust {job['trust']})\n")
    if not (args.follow or args.json):
        return 0
    try:
        follow(remote, job_id, sys.stderr.buffer if args.follow and sys.stderr else None)
    except KeyboardInterrupt:
        sys.stderr.write(f"stockade: stopped following; the job goes on (stockade logs -f "
                         f"{job_id}, stockade cancel {job_id})\n")
        raise
    result = _result(remote, job_id)
    if args.json:
        sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    return EXIT_BY_STATUS.get(result["status"], 4)


def _read_spec(path: Path) -> tuple[str, int]:
    """The spec's text, validated here (SpecError, exit 2), and its workspace size."""
    from stockade.errors import UsageError
    from stockade.spec.load import read_spec_file
    from stockade.spec.parse import parse_spec

    data = read_spec_file(path)
    job = parse_spec(data, source=str(path)).to_job()
    try:
        return data.decode("utf-8"), job.resources.workspace
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: the spec is not UTF-8 text") from e


def _upload_workspace(remote: Remote, directory: Path, excludes: tuple[str, ...],
                      limit: int) -> str:
    """Pack ``directory`` (as stockade run would copy it) and upload it; its sha256."""
    import tempfile

    from stockade.errors import UsageError
    from stockade.sandbox.archive import pack
    from stockade.sandbox.interface import WorkspaceSource
    from stockade.sandbox.workspace import check_workspace

    if not directory.is_dir():
        raise UsageError(f"workspace {_e(directory)} is not a directory",
                         hint="pass --workspace DIR with an existing directory")
    source = WorkspaceSource(directory, excludes)
    check_workspace(source, limit, limit)
    with tempfile.TemporaryFile(prefix="stockade-workspace-") as f:
        info = pack(source, f, limit)
        f.seek(0)
        files = f"{info.files} file{'' if info.files == 1 else 's'}"
        sys.stderr.write(f"stockade: workspace: {files} ({info.bytes} bytes), "
                         f"{info.size} bytes packed\n")
        remote.upload("/api/v1/workspaces", "submitter", f, {
            "X-Stockade-Sha256": info.sha256, "Content-Length": str(info.size),
            "Content-Type": "application/gzip"})
    return info.sha256


def follow(remote: Remote, job_id: str, out: Any) -> None:
    """Copy the job's live log to ``out`` (a binary stream, or None) until it ends."""
    from stockade.text import escape_lines

    for event in remote.events(f"/api/v1/jobs/{job_id}/log/stream", "viewer",
                               missing=f"no job {job_id} on the server"):
        if event.kind == "message" and out is not None:
            out.write(escape_lines(event.data.encode()))  # a no-op on a runner's escaped log
            out.flush()


def _result(remote: Remote, job_id: str) -> dict[str, Any]:
    result = remote.json("GET", f"/api/v1/jobs/{job_id}", "viewer",
                         missing=f"no job {job_id} on the server")
    return dict(result)


def _e(value: object) -> str:
    from stockade.text import escape_controls

    return escape_controls(str(value))
