"""``stockade up``: a whole fleet on this host, for trying stockade out and for tests."""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.cli.remote import Remote
    from stockade.config import Settings
    from stockade.control import ControlService

HELP = "start a server and runner agents on this host (one command, Ctrl-C stops all)"
DESCRIPTION = """\
stockade up [--runners N] [--listen 127.0.0.1:PORT] [--env-file PATH]

Starts `stockade server` over this installation's state directory ($STOCKADE_HOME) on a
loopback address (a free port by default), makes an admin API token and N single-use
enrolment tokens, and starts N runner agents (`stockade runner start`, named up-1 ... up-N,
each with its own state directory $STOCKADE_HOME/up/up-<i> for its key). Once the server
answers and every runner is enrolled, attested and active, it prints

  STOCKADE_SERVER=http://127.0.0.1:PORT
  STOCKADE_TOKEN=stk_...

on stdout (and writes the same two lines to --env-file PATH: a new file of this user's, mode
0600, put in the place of what PATH named), so that `stockade submit`, `jobs`, `logs -f`, ...
in another shell talk to it:

  stockade up --env-file .stockade.env &
  set -a; . ./.stockade.env; set +a; stockade submit job.yaml --follow

Ctrl-C or SIGTERM stops everything cleanly: the runners first (each finishes or, after a
while, cancels the job it runs), then the server; the admin token is revoked; exit 0. If a
part fails to start, or dies, the rest is stopped and the failure is reported (exit 4).
If stockade up itself is killed (SIGKILL), its server and runners get SIGTERM; its admin token
then lives on until it expires (7 days) or the next stockade up on this state directory
revokes it. The processes' own messages go to stderr, prefixed with their names."""

READY_TIMEOUT_S = 120.0
RUNNER_STOP_S = 30.0  # a runner finishes its job this long, then it is asked to cancel it
KILL_AFTER_S = 15.0
MAX_RUNNERS = 16
TAIL = 20  # lines of a part's output kept to explain its failure
TOKEN_TTL_S = 7 * 24 * 3600.0  # up's admin token, should up be killed before revoking it
TOKEN_NAME = "stockade-up-"
_PR_SET_PDEATHSIG = 1


class _Stop(Exception):
    """SIGTERM: stop everything."""


_HURRY = threading.Event()  # a signal while stopping: shorten every wait


class Part:
    """One child process, its output forwarded to stderr with its name in front."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str],
                 group: int = 0) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        self.first_line = threading.Event()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     process_group=group, text=True, errors="replace",
                                     preexec_fn=_dies_with_us())
        threading.Thread(target=self._forward, args=(self.proc.stdout,), daemon=True,
                         name=f"out-{name}").start()

    def _forward(self, stream: IO[str]) -> None:
        from stockade.text import escape_controls

        for line in stream:
            text = escape_controls(line.rstrip("\n"))
            self.tail.append(text)
            self.first_line.set()
            sys.stderr.write(f"{self.name}: {text}\n")
        self.first_line.set()

    def failure(self) -> str:
        """What it said last, for an error message."""
        said = "\n  ".join(self.tail) or "(no output)"
        return f"{self.name} exited with status {self.proc.returncode}:\n  {said}"

    def stop(self, grace: float) -> None:
        """SIGTERM; after ``grace`` a second SIGTERM, then SIGKILL (each wait cut to a
        second once someone pressed Ctrl-C again)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGTERM, KILL_AFTER_S),
                          (signal.SIGKILL, KILL_AFTER_S)):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            end = time.monotonic() + wait
            while self.proc.poll() is None and time.monotonic() < end:
                if _HURRY.is_set():
                    end = min(end, time.monotonic() + 1.0)
                time.sleep(0.1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--runners N] [--listen ADDR] [--env-file PATH]``."""
    p.add_argument("--runners", type=int, default=1, metavar="N",
                   help=f"runner agents to start, 0 to {MAX_RUNNERS} (default 1)")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="the server's loopback address (default 127.0.0.1:0: a free port)")
    p.add_argument("--env-file", type=Path, metavar="PATH",
                   help="also write STOCKADE_SERVER and STOCKADE_TOKEN to PATH (mode 0600)")


def main(args: argparse.Namespace) -> int:
    """Start, report, wait for a signal, stop."""
    from stockade.cli.context import close_control, open_control
    from stockade.cli.remote import _loopback
    from stockade.errors import UsageError

    if not 0 <= args.runners <= MAX_RUNNERS:
        raise UsageError(f"--runners is 0 to {MAX_RUNNERS}")
    host = args.listen.rpartition(":")[0].strip("[]")
    if not _loopback(host):
        raise UsageError(f"--listen {args.listen[:80]!r} is not a loopback address",
                         hint="stockade up serves plain http on this host only; for other "
                              "hosts run stockade server behind TLS")
    if args.env_file:
        _check_env_file(args.env_file)
    settings, control = open_control()
    started = time.time()
    _revoke_left_behind(control)
    token_id, token = _admin_token(control)
    enrol = _enrol_tokens(settings, control, args.runners)
    close_control()  # the server and runners own the database from here
    parts: list[Part] = []
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        return _run(args, settings.home, token, enrol, started, parts)
    except (KeyboardInterrupt, _Stop):
        sys.stderr.write("stockade up: stopping (Ctrl-C again to hurry)\n")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal_while_stopping)
        _stop_all(parts)
        _revoke(token_id)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _on_term(_signum: int, _frame: object) -> None:
    raise _Stop()


def _on_signal_while_stopping(_signum: int, _frame: object) -> None:
    _HURRY.set()


def _run(args: argparse.Namespace, home: Path, token: str, enrol: list[str],
         started: float, parts: list[Part]) -> int:
    """Start the parts, wait until they are ready, print the variables, then watch."""
    from stockade.cli.remote import Remote
    from stockade.errors import InfrastructureError

    server = Part("server", _stockade("server", "--listen", args.listen), _env(home))
    parts.append(server)
    url = _server_url(server)
    for i, secret in enumerate(enrol, 1):
        runner_home = home / "up" / f"up-{i}"
        runner_home.mkdir(mode=0o700, parents=True, exist_ok=True)
        parts.append(Part(f"up-{i}", _stockade(  # the token in the environment, not in ps
            "runner", "start", "--server", url, "--name", f"up-{i}"),
            {**_env(runner_home), "STOCKADE_ENROL_TOKEN": secret}, group=server.proc.pid))
    remote = Remote(url, token)
    try:
        _wait_ready(remote, parts, len(enrol), started)
        lines = f"STOCKADE_SERVER={url}\nSTOCKADE_TOKEN={token}\n"
        if args.env_file:
            _write_env_file(args.env_file, lines)
        sys.stdout.write(lines)
        sys.stdout.flush()
        sys.stderr.write(f"stockade up: server {url} and {len(enrol)} runner(s) ready; "
                         "Ctrl-C stops them\n")
        while True:
            for part in parts:
                if part.proc.poll() is not None:
                    raise InfrastructureError(f"{part.failure()}\nstopping the rest")
            time.sleep(0.5)
    finally:
        remote.close()


def _stockade(*args: str) -> list[str]:
    """The command line of ``stockade ARGS`` with this interpreter."""
    return [sys.executable, "-m", "stockade.cli.main", *args]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STOCKADE_SERVER", "STOCKADE_TOKEN", "STOCKADE_CA_FILE")}
    env["STOCKADE_HOME"] = str(home)
    return env


def _server_url(server: Part) -> str:
    """The address the server says it listens on (InfrastructureError if it does not)."""
    from stockade.errors import InfrastructureError

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in list(server.tail):
            if "listening on http://" in line:
                return line.split("listening on ")[1].strip()
        if server.proc.poll() is not None:
            server.first_line.wait(1)
            raise InfrastructureError(f"the server did not start: {server.failure()}")
        time.sleep(0.05)
    raise InfrastructureError("the server did not say where it listens within 60 s")


def _wait_ready(remote: Remote, parts: list[Part], runners: int, started: float) -> None:
    """Until the server answers and ``runners`` agents named up-<i> attested since
    ``started`` are active (InfrastructureError naming what failed otherwise)."""
    from stockade.errors import InfrastructureError, StockadeError

    deadline, problem = time.monotonic() + READY_TIMEOUT_S, "the server did not answer"
    wanted = {f"up-{i}" for i in range(1, runners + 1)}
    while time.monotonic() < deadline:
        for part in parts:
            if part.proc.poll() is not None:
                time.sleep(0.2)  # its last words
                raise InfrastructureError(f"{part.failure()}\nstopping the rest")
        try:
            listed = remote.json("GET", "/api/v1/runners", "admin")
        except StockadeError as e:
            problem = e.message
        else:
            ready = {r["name"] for r in listed if r["name"] in wanted and r["status"] ==
                     "active" and (r["attested_at"] or 0) >= started - 1}
            if ready == wanted:
                return
            problem = f"runners not active yet: {', '.join(sorted(wanted - ready))}"
        time.sleep(0.2)
    raise InfrastructureError(f"not ready after {READY_TIMEOUT_S:.0f} s: {problem}")


def _dies_with_us() -> Callable[[], None]:
    """What a child runs before its program: it gets SIGTERM when up dies, however up dies
    (PR_SET_PDEATHSIG, which the program keeps), so that a killed up leaves nothing running.
    (prctl is looked up here: the child only calls it. The signal comes when the thread that
    started the child ends: parts are started from up's main thread.)"""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, term = os.getpid(), int(signal.SIGTERM)

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, term)
        if os.getppid() != parent:  # up died before the call: nobody would tell
            os._exit(1)

    return in_child


def _revoke_left_behind(control: ControlService) -> None:
    """Revoke the admin tokens of earlier ``stockade up`` runs on this state directory that
    did not revoke their own (killed), unless that up is still running."""
    from stockade.audit import AuditEvent

    now = time.time()
    for row in control.store.tokens():
        if not row.name.startswith(TOKEN_NAME) or row.revoked_at is not None \
                or (row.expires_at is not None and row.expires_at <= now) \
                or _up_running(row.name.removeprefix(TOKEN_NAME)):
            continue
        control.store.revoke_token(row.id, now, AuditEvent(
            control.actor, "token.revoked", now, None, {
                "token": row.id, "by": "stockade up", "reason": "left by a stopped stockade up"}))


def _up_running(pid: str) -> bool:
    """Whether process ``pid`` is a ``stockade up``."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except OSError:
        return False
    return b"up" in argv and any(b"stockade" in arg for arg in argv)


def _admin_token(control: ControlService) -> tuple[str, str]:
    """A new admin API token (revoked when up stops; it expires after ``TOKEN_TTL_S`` should
    up be killed): its id and the token."""
    from stockade.api import auth
    from stockade.audit import AuditEvent

    now = time.time()
    row, token = auth.new_token(f"{TOKEN_NAME}{os.getpid()}", "admin", "protected",
                                TOKEN_TTL_S, now)
    control.store.insert_token(row, AuditEvent(control.actor, "token.created", now, None, {
        "token": row.id, "role": row.role, "max_trust": row.max_trust, "by": "stockade up"}))
    return row.id, token


def _enrol_tokens(settings: Settings, control: ControlService, n: int) -> list[str]:
    from stockade.cli.context import fleet_service

    fleet = fleet_service(settings, control)
    return [fleet.create_enrol_token("default", 600, control.actor, max_trust="protected")[1]
            for _ in range(n)]


def _revoke(token_id: str) -> None:
    """Revoke up's admin token (its variables are of no use once the server stopped)."""
    from stockade.audit import AuditEvent
    from stockade.cli.context import close_control, open_control
    from stockade.errors import StockadeError

    try:
        _, control = open_control(recover=False)
        now = time.time()
        control.store.revoke_token(token_id, now, AuditEvent(
            control.actor, "token.revoked", now, None, {"token": token_id,
                                                        "by": "stockade up"}))
    except StockadeError as e:
        sys.stderr.write(f"stockade up: could not revoke its admin token {token_id}: "
                         f"{e.message}\nhint: stockade token revoke {token_id}\n")
    finally:
        close_control()


def _stop_all(parts: list[Part]) -> None:
    """Runners first (at once, each finishing its job), then the server."""
    runners = [p for p in parts if p.name != "server"]
    threads = [threading.Thread(target=p.stop, args=(RUNNER_STOP_S,)) for p in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in parts:
        if p.name == "server":
            p.stop(KILL_AFTER_S)


def _check_env_file(path: Path) -> None:
    """UsageError unless ``path`` is in a directory and names nothing or a regular file."""
    from stockade.errors import UsageError

    try:
        if not stat.S_ISDIR(os.stat(path.parent).st_mode):
            raise UsageError(f"--env-file {path}: {path.parent} is not a directory")
        found = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"cannot use --env-file {path}: {e.strerror}") from e
    if not stat.S_ISREG(found):
        raise UsageError(f"--env-file {path} exists and is not a regular file",
                         hint="name a new file, or a regular file to replace")


def _write_env_file(path: Path, text: str) -> None:
    """``text`` into a new file readable by this user only, put in the place of ``path``:
    whoever owned or had opened the file there before never sees it (never through a link;
    everything relative to the directory opened once)."""
    from stockade.errors import UsageError

    _check_env_file(path)
    try:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot write --env-file {path}: {e.strerror}") from e
    try:
        temporary = _new_file(directory, path.name, text)
        try:
            os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError:
            os.unlink(temporary, dir_fd=directory)
            raise
    except OSError as e:
        raise UsageError(f"cannot write --env-file {path}: {e.strerror}") from e
    finally:
        os.close(directory)


def _new_file(directory: int, name: str, text: str) -> str:
    """A new file (0600) with ``text`` in ``directory`` next to ``name``: its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        temporary = f".{name[:200]}.{secrets.token_hex(8)}"
        try:
            fd = os.open(temporary, flags, 0o600, dir_fd=directory)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, text.encode())
            os.fsync(fd)
        except OSError:
            os.unlink(temporary, dir_fd=directory)
            raise
        finally:
            os.close(fd)
        return temporary
    raise FileExistsError(17, "no free temporary name")
