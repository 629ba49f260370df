"""``stockade runner start``: a runner agent that enrols with a server, attests, long-polls for
jobs and runs each in a fresh sandbox, exactly as ``stockade run`` does, reporting over HTTP.

Per attempt, beside the job: a heartbeat thread (extends the lease; a cancel or a lost lease
stops the sandbox) and a log shipper (uploads the masked log file in numbered chunks; a chunk
the server did not acknowledge is sent again with the same number, so nothing is lost or
duplicated while the server restarts). Artifacts are uploaded with their sha256 before the
completion, which names them. The first SIGINT/SIGTERM stops claiming and lets running jobs
finish; a second cancels them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.api.protocol import Assignment, Completion, FailureReason
from stockade.errors import InfrastructureError, StockadeError, UsageError
from stockade.runner.attempt import Attempt
from stockade.runner.logs import JobLog
from stockade.runner.remote import Refused, RemoteControl, Session, Unreachable
from stockade.sandbox.archive import ArchiveRefused

if TYPE_CHECKING:
    from stockade.config import Settings
    from stockade.sandbox.interface import Backend, WorkspaceSource

CHUNK = 256 * 1024
SHIP_EVERY_S = 0.2


def add_start_arguments(p: argparse.ArgumentParser) -> None:
    """``--server URL --enrol-token T [--name N] [--labels L,...] [--concurrency N]``."""
    p.add_argument("--server", metavar="URL", required=True,
                   help="the stockade server (https://..., or http:// on loopback)")
    p.add_argument("--enrol-token", metavar="TOKEN", default=None,
                   help="a single-use token from 'stockade runner enrol-token' (needed the "
                   "first time; afterwards the runner attests with its key). Default: "
                   "$STOCKADE_ENROL_TOKEN, which other users of the host cannot read in ps")
    p.add_argument("--name", default=None, help="this runner's name (default: the host name)")
    p.add_argument("--labels", default="", metavar="L1,L2",
                   help="labels this runner offers (a job runs where it finds all its labels)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="jobs run at once (default 1)")
    p.add_argument("--ca-file", default=None, metavar="PEM",
                   help="CA certificates to verify the server's TLS certificate with")


def start(args: argparse.Namespace) -> int:
    """Enrol or attest, then run jobs until stopped."""
    import os

    from stockade.config import ensure_home, load_settings
    from stockade.runner.attest import Identity, measure
    from stockade.sandbox import get_backend

    server = args.server.rstrip("/")
    enrol = args.enrol_token or os.environ.get("STOCKADE_ENROL_TOKEN") or None
    if not server.startswith(("http://", "https://")):
        raise UsageError(f"--server {server[:80]!r} is not an http(s) URL",
                         hint="e.g. --server https://stockade.example:8377")
    if not 1 <= args.concurrency <= 64:
        raise UsageError("--concurrency is 1 to 64")
    name = args.name or os.uname().nodename.split(".")[0]
    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
    settings = load_settings()
    ensure_home(settings)
    backend = get_backend(settings.sandbox_backend, settings)
    identity = Identity(settings.home / "runner")
    _lock_home(settings.home / "runner" / "agent.lock")
    _forget_earlier_jobs(settings)
    for job_id in backend.reap_orphans(lambda job_id: True):  # its state dir is the agent's
        sys.stderr.write(f"stockade runner: removed what job {job_id} left when this agent "
                         "stopped last time (its server requeues or fails the job)\n")
    session = Session(server, identity, lambda: measure(settings, backend),
                      verify=args.ca_file or True)
    try:
        session.attest(enrol, name, labels, args.concurrency)
    except Refused as e:
        if e.status == 403 and session.runner_id is not None and enrol:
            session.runner_id = None  # known here but not there (or quarantined): enrol anew
            session.attest(enrol, name, labels, args.concurrency)
        else:
            raise UsageError(f"the server refused this runner: {e.detail}",
                             hint="ask an admin for a new enrolment token (stockade runner "
                                  "enrol-token) and pass it with --enrol-token") from e
    except Unreachable as e:
        raise InfrastructureError(f"cannot reach {server}: {e}",
                                  hint="check --server and that the server runs") from e
    agent = Agent(settings, backend, session, args.concurrency)
    return agent.serve()


def _forget_earlier_jobs(settings: Settings) -> None:
    """What an earlier agent of this state directory left of its jobs (it was killed): their
    unpacked workspaces, logs and artifacts (the server has what it was sent)."""
    shutil.rmtree(settings.home / "workspaces", ignore_errors=True)
    for directory in (settings.logs_dir, settings.artifacts_dir):
        for entry in directory.iterdir() if directory.is_dir() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _lock_home(path: Path) -> None:
    """Hold an exclusive lock on ``path`` for the life of the process: one agent per state
    directory (what its sandboxes leave is its own to remove)."""
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"another runner agent uses the state directory {path.parent.parent}",
                         hint="give each agent its own STOCKADE_HOME") from None


class Agent:
    """Worker threads that claim and run jobs, and the session kept fresh."""

    def __init__(self, settings: Settings, backend: Backend, session: Session,
                 concurrency: int) -> None:
        self.settings, self.backend, self.session = settings, backend, session
        self.control = RemoteControl(session)
        self.concurrency = concurrency
        self.stopping = threading.Event()
        self.fatal: str | None = None
        self._attempts: dict[str, Attempt] = {}
        self._holding: set[str] = set()  # workers with a job (running, or next in line)
        self._lock = threading.Lock()

    def serve(self) -> int:
        """Run until SIGINT/SIGTERM (or until the server quarantines this runner)."""
        signals = 0

        def on_signal(signum: int, _frame: object) -> None:
            nonlocal signals
            signals += 1
            self.stopping.set()
            if signals > 1:
                self.cancel_all("the runner agent was stopped")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        workers = [threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for w in workers:
            w.start()
        sys.stderr.write(f"stockade runner {self.session.runner_id} attested; waiting for jobs "
                         f"from {self.session.server}\n")
        sys.stderr.flush()
        while not self.stopping.wait(1.0):
            if self.session.due():
                self._renew()
        for w in workers:  # idle workers wait in a long poll: they are daemons
            while w.is_alive() and self._busy(w.name):
                w.join(0.5)
        if self.fatal:
            sys.stderr.write(f"stockade runner: {self.fatal}\n")
            return 4
        return 0

    def _busy(self, worker: str) -> bool:
        with self._lock:
            return worker in self._holding

    def _renew(self) -> None:
        try:
            self.session.attest()
        except Refused as e:
            self._stop(f"the server refused this runner's attestation: {e.detail}")
        except Unreachable:
            pass  # the session lasts a while yet: try again in a second

    def _stop(self, why: str) -> None:
        self.fatal = why
        self.stopping.set()
        self.cancel_all(why)

    def cancel_all(self, why: str) -> None:
        """Cancel every running attempt."""
        with self._lock:
            attempts = list(self._attempts.values())
        for attempt in attempts:
            attempt.cancel(why)

    def _work(self) -> None:
        runner_id = self.session.runner_id or ""
        a: Assignment | None = None
        while a is not None or not self.stopping.is_set():
            if a is None:
                try:
                    a = self.control.claim(runner_id, ())
                except Refused as e:
                    if e.status in (401, 403):
                        self._stop(f"the server refused this runner: {e.detail}")
                        return
                    time.sleep(1.0)
                    continue
                except Unreachable:
                    time.sleep(1.0)
                    continue
            if a is not None:  # (claimed while stopping: it runs all the same)
                a = self._hold(a)

    def _hold(self, a: Assignment) -> Assignment | None:
        """Run ``a``; the worker counts as busy until it has no next job in hand either."""
        me, following = threading.current_thread().name, None
        with self._lock:
            self._holding.add(me)
        try:
            following = self._run(a)
        finally:
            if following is None:
                with self._lock:
                    self._holding.discard(me)
        return following

    def _run(self, a: Assignment) -> Assignment | None:
        """Run one attempt; the next job, if the completion brought one."""
        settings = self.settings
        self.backend.warm()
        log = JobLog(settings.logs_dir / f"{a.job_id}.log", settings.log_cap_bytes, None)
        attempt = Attempt(settings, self.backend, self.control, self.session.runner_id or "",
                          a, log)
        me = threading.current_thread().name
        with self._lock:
            self._attempts[me] = attempt
        shipper = LogShipper(self.control, a, log.path)
        over = threading.Event()  # set once the completion is in: the heartbeats stop then
        beat = threading.Thread(target=self._heartbeat, args=(a, attempt, over),
                                daemon=True, name=f"heartbeat-{a.job_id}")
        beat.start()
        shipper.start()
        scratch = settings.home / "workspaces" / a.job_id
        following = None
        try:
            try:
                workspace = self._workspace(a, scratch, attempt)
            except ArchiveRefused as e:  # the job's input, not this runner: the job fails
                completion = attempt.refused(FailureReason.POLICY_DENIED,
                                             f"the workspace archive was refused: {e.message}")
            else:
                completion = attempt.run(workspace)
            shipper.finish()
            completion = self._upload_artifacts(a, completion)
            _, following = self.control.complete_and_claim(
                completion, take_next=not self.stopping.is_set())
        except StockadeError as e:
            sys.stderr.write(f"stockade runner: job {a.job_id}: {e.diagnostics()}\n")
        finally:
            over.set()
            shipper.stop()
            with self._lock:
                self._attempts.pop(me, None)
            beat.join(timeout=1)
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(settings.artifacts_dir / a.job_id, ignore_errors=True)
            with contextlib.suppress(OSError):
                log.path.unlink()
        return following

    def _workspace(self, a: Assignment, scratch: Path, attempt: Attempt
                   ) -> WorkspaceSource | None:
        """The job's workspace archive, downloaded, checked and unpacked (None: empty;
        ArchiveRefused if it is not one this job may have)."""
        from stockade.sandbox.archive import ArchiveLimits, unpack
        from stockade.sandbox.interface import WorkspaceSource

        digest = a.workspace_sha256
        if not digest:
            return None
        try:
            data = self.control.workspace(a.job_id, a.attempt)
        except (Refused, Unreachable) as e:
            raise InfrastructureError(f"the workspace archive could not be fetched: {e}") from e
        if hashlib.sha256(data).hexdigest() != digest:  # (the server's fault, not the job's)
            raise InfrastructureError("the workspace archive the server sent does not match "
                                      "its sha256")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700, parents=True)
        archive = scratch.with_suffix(".tar")
        try:
            archive.write_bytes(data)
            unpack(archive, scratch / "tree", ArchiveLimits.for_workspace(
                attempt.spec.resources.workspace), digest)
        finally:
            with contextlib.suppress(OSError):
                archive.unlink()
        return WorkspaceSource(scratch / "tree", ())

    def _upload_artifacts(self, a: Assignment, c: Completion) -> Completion:
        """Upload each artifact (the server checks its sha256); the completion lists them."""
        root = self.settings.artifacts_dir / a.job_id
        for art in c.artifacts:
            try:  # streamed from the file (the server checks the sha256 of what it gets)
                self.control.put_artifact(a.job_id, a.attempt, art.sha256, root / art.path)
            except Refused as e:
                raise InfrastructureError(f"artifact upload refused: {e.detail}") from e
        return c

    def _heartbeat(self, a: Assignment, attempt: Attempt, over: threading.Event) -> None:
        """Extend the lease every heartbeat until the attempt is completed; stop the job on a
        cancel, a lost lease, or when the server has not answered for so long that the lease
        may have run out (the runner fences itself: the job may go to another runner, and two
        copies must never run at once)."""
        beat, lease = self.session.heartbeat_s, self.session.lease_s
        give_up_after = max(lease / 2, lease - 2 * beat)
        last_ok = time.monotonic()
        while not over.wait(beat):
            try:
                held, cancel = self.control.heartbeat(a.job_id, a.attempt)
            except Refused as e:
                if e.status in (401, 403):  # quarantined, or its attestation failed
                    self._stop(f"the server refused this runner: {e.detail}")
                    return
                continue
            except (Unreachable, OSError):  # a restart (the lease outlasts a few missed beats),
                silent = time.monotonic() - last_ok  # or no descriptor left for a moment
                if silent > give_up_after:
                    attempt.cancel(f"the control plane did not answer for {silent:.0f} s, "
                                   "close to the job's lease: stopped, as another runner may "
                                   "get the job")
                continue
            last_ok = time.monotonic()
            if not held:
                attempt.cancel("this runner lost the job's lease (another attempt has it)")
                return
            if cancel:
                attempt.cancel("canceled on request")


class LogShipper(threading.Thread):
    """Uploads a job's log file as it grows, in numbered chunks, each until acknowledged."""

    def __init__(self, control: RemoteControl, a: Assignment, path: Path) -> None:
        super().__init__(daemon=True, name=f"log-{a.job_id}")
        self.control, self.a, self.path = control, a, path
        self.offset, self.seq = 0, 0
        self.done = threading.Event()
        self.fenced = False
        self._lock = threading.Lock()  # the thread and finish() never ship at once

    def run(self) -> None:
        """Ship what is new every :data:`SHIP_EVERY_S` until :meth:`finish` or :meth:`stop`."""
        while not self.done.wait(SHIP_EVERY_S):
            with contextlib.suppress(Unreachable, OSError):
                self._ship(final=False)
            if self.fenced:
                return

    def _ship(self, final: bool) -> None:
        with self._lock:
            if not self.fenced:
                self._ship_new(final)

    def _ship_new(self, final: bool) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            f.seek(self.offset)
            while True:
                data = f.read(CHUNK)
                if not final and len(data) < CHUNK:  # a partial line goes with the next chunk
                    data = data[:data.rfind(b"\n") + 1]
                if not data:
                    return
                state = self.control.put_log(self.a.job_id, self.a.attempt, self.seq, data)
                if state in ("fenced", "full"):
                    self.fenced = True
                    return
                self.offset += len(data)
                self.seq += 1

    def finish(self) -> None:
        """Ship the rest (the attempt is over), retrying while the server is away."""
        self.done.set()
        self.join(timeout=5)
        self._ship(final=True)

    def stop(self) -> None:
        """Stop shipping."""
        self.done.set()

