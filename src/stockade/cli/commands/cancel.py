"""``stockade cancel JOB``: stop a queued or running job."""

from __future__ import annotations

import argparse

from stockade.cli.remote import add_server_argument

HELP = "cancel a queued or running job"
DESCRIPTION = """\
stockade cancel JOB [--server URL]

A queued job fails at once (failure_reason canceled); a running job is asked to stop: its
runner agent sees the request at its next heartbeat (every runner_heartbeat_s, 2 s by
default), stops the sandbox and records the job as canceled. A finished job cannot be
canceled (exit 2).

With --server (or $STOCKADE_SERVER) the job is a server's: a submitter token in
$STOCKADE_TOKEN cancels the jobs it submitted, an admin token any job. Without, the job is
this host's: a stockade run in progress sees the request within runner_heartbeat_s as an
agent does (or stop it with Ctrl-C in its terminal)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB [--server URL]``."""
    p.add_argument("job", metavar="JOB", help="job id or a unique prefix of it")
    add_server_argument(p)


def main(args: argparse.Namespace) -> int:
    """Cancel, and say what happened."""
    from stockade.cli.remote import connect
    from stockade.errors import UsageError

    remote = connect(args)
    if remote is not None:
        job_id = remote.job_id(args.job)
        state = remote.json("POST", f"/api/v1/jobs/{job_id}/cancel", "submitter",
                            missing=f"no job {job_id} on the server")["state"]
    else:
        from stockade.cli.context import fleet_service, open_control, require_job

        settings, control = open_control()
        job = require_job(control, args.job).job
        job_id = job.id
        state = fleet_service(settings, control).cancel(job_id, control.actor)
        if state is None:
            now = control.job(job_id)
            status = now.status if now is not None else job.status
            if status in ("queued", "running"):
                raise UsageError(f"a cancel of job {job_id} was requested already",
                                 hint=f"stockade show {job_id} says when it ends")
            raise UsageError(f"job {job_id} has finished ({status}): nothing to cancel")
    if state == "canceled":
        print(f"job {job_id} canceled")
    else:
        print(f"job {job_id}: cancel requested; its runner stops it at its next heartbeat")
    return 0
