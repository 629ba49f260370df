"""Fleet dispatch over real HTTP against real ``stockade server`` processes, side by side with
a raw claim loop on the same database.

(1) Capacity: 50 runner clients, each enrolled for real (Ed25519 key, server nonce, signed
    measurements), loop ``POST /api/v1/runner/claim?wait=5`` then at once
    ``POST .../complete?next=true`` (succeeded), whose answer carries the next job if one is
    queued (then no claim request is needed), as the runner agent does. The queue is fed
    beforehand: a backlog of trivial jobs (12,000 by default: 8-20 s of draining, so that a
    run's figure moves less with what else the machine does in a few seconds) queued in bulk
    through the control plane (one transaction and audit event each, as the API's submit makes
    them), so that the servers spend their time on claims and completions only. Claims/s over
    the sustained part of the drain: after a warm-up, until fewer jobs than two per runner
    remain.
(2) Claim latency: a submitter posts trivial jobs (``POST /api/v1/jobs``, admin token) at a
    fixed rate (open loop, half the capacity measured in (1) by default, at most 1000/s) to
    the same idle long-polling runners; latency = the moment the claim response arrives at the
    runner minus the job's ``created_at`` in the database (both clocks are this host's).
    ``started_at - created_at`` (the server's own view) is reported too. Then 3 s of an idle
    fleet: the cores the servers and PostgreSQL use while every runner long-polls an empty queue.
(3) Configurations side by side: SQLite and PostgreSQL (a throwaway loopback cluster, as the
    test suite starts it) x 1 and 2 server replicas on one database (runners split evenly).
(4) Baseline per configuration: a raw claim loop on the same kind of database with the same
    concurrency (50 threads, persistent connections): SQLite ``BEGIN IMMEDIATE`` select+update,
    PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` + update; ``ratio_to_raw`` = fleet
    claims/s over raw claims/s (the raw loop claims only; the fleet also completes each job).
(5) Submit -> first step: a real runner agent (bwrap sandbox) long-polls idle; 20 sequential
    one-step jobs (``date +%s.%N``); latency = the time the step printed minus the moment the
    submit request was sent; the step's output is read back from the stored log chunks.

The load generator is a lean asyncio HTTP/1.1 client (``support.fleet.Http``) so that it costs
the servers little of the two cores; CPU per claim+complete cycle of the servers (and of their
event-loop threads), PostgreSQL and the load generator is reported, and the cores other
processes of this shared machine used meanwhile, since CPU bounds what two cores can do.

``--profile sqlite|postgresql`` (repeatable): the HTTP floor of a server (``GET /healthz``), the
server CPU of a submission (``POST /api/v1/jobs`` at 300/s), the control-plane core without
HTTP (FleetService.serve in batches, one thread), and a run with the server under cProfile
(CPU time, every thread) summarised by layer.
``--profile first-step``: the runner agent's phases stamped (wrapped in the benchmark, not in
stockade) to show where submit -> first step goes. ``--server-env PYTHONPATH=DIR`` runs the
servers on another copy of the code or with extra packages (uvloop, httptools), to measure a
change before making it. Prints a table, then ``RESULT {json}`` lines. Run as root; about 5
minutes without ``--profile``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import fleet as sf

COMPLETE = json.dumps({"status": "succeeded", "duration_s": 0.0}).encode()
JSON = "Content-Type: application/json\r\n"
TARGET_CLAIMS_PER_S, TARGET_P99_MS, TARGET_FIRST_STEP_P50_MS = 1000.0, 100.0, 150.0
SUBMIT_RATE = 300.0  # submissions/s whose server CPU --profile measures
PROFILED_BACKLOG = 4000  # the backlog of the run under cProfile (about 3x slower)


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``, rounded to 0.1 (None if empty)."""
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))], 1) if s else None


# -- the fleet: runner clients, submitter, CPU -----------------------------------------


class Load:
    """What the runner clients saw."""

    def __init__(self) -> None:
        self.claims: list[tuple[float, str]] = []  # (arrival, job id)
        self.errors: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.stop = asyncio.Event()


async def runner_loop(r: sf.Runner, load: Load, source: str) -> None:
    """Long-poll a claim, complete it at once (succeeded) asking for the next job, as the
    runner agent does; long-poll again when the completion brings none; from ``source``."""
    http, auth = sf.Http(r.url, source), f"Authorization: Bearer {r.token}\r\n"
    a = None
    try:
        while not load.stop.is_set():
            if a is None:
                status, body = await http.request("POST", "/api/v1/runner/claim?wait=5",
                                                  headers=auth)
                now = time.time()
                load.requests[f"claim {status}"] += 1
                if status == 204:
                    continue
                if status != 200:
                    load.errors[f"claim {status}"] += 1
                    await asyncio.sleep(0.05)
                    continue
                a = json.loads(body)
                load.claims.append((now, a["job_id"]))
            status, body = await http.request(
                "POST", f"/api/v1/runner/jobs/{a['job_id']}/{a['attempt']}/complete?next=true",
                COMPLETE, auth + JSON)
            now = time.time()
            load.requests[f"complete {status}"] += 1
            a = None
            if status != 200:
                load.errors[f"complete {status}"] += 1
                continue
            a = json.loads(body)["next"]
            if a is not None:
                load.claims.append((now, a["job_id"]))
    finally:
        http.close()


class Cpu:
    """CPU seconds, sampled every 0.2 s: the servers (and their event-loop threads), the
    PostgreSQL cluster, this process (the load generator), the machine."""

    def __init__(self, servers: list[int], postmaster: int | None) -> None:
        self.servers, self.postmaster = servers, postmaster
        self.samples: list[tuple[float, ...]] = []

    def sample(self) -> None:
        """Take one sample."""
        pg = sf.children_cpu(self.postmaster) if self.postmaster else 0.0
        self.samples.append((time.time(), sum(sf.cpu_seconds(p) for p in self.servers), pg,
                             time.process_time(), sf.machine_busy()[0],
                             sum(sf.cpu_seconds(p, p) for p in self.servers)))

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop``."""
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(0.2)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds each used between two moments (nearest samples)."""
        a = min(self.samples, key=lambda s: abs(s[0] - t0))
        b = min(self.samples, key=lambda s: abs(s[0] - t1))
        return {"server": b[1] - a[1], "server_loop": b[5] - a[5], "postgres": b[2] - a[2],
                "client": b[3] - a[3], "machine": b[4] - a[4], "seconds": b[0] - a[0]}


async def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    """Poll ``check`` every 20 ms for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def submitter(urls: list[str], token: str, rate: float, duration: float,
                    spec: str = sf.TRIVIAL_SPEC) -> tuple[list[str], float]:
    """Submit jobs at ``rate``/s for ``duration`` s (open loop over a pool of connections);
    the job ids and the rate achieved."""
    pool: asyncio.Queue[sf.Http] = asyncio.Queue()
    for i in range(32):  # from addresses of their own, as a CI system's would be
        pool.put_nowait(sf.Http(urls[i % len(urls)], sf.host_address(1000 + i)))
    body = json.dumps({"spec": spec, "trust": "trusted"}).encode()
    headers = f"Authorization: Bearer {token}\r\n{JSON}"
    ids: list[str] = []
    errors: Counter[str] = Counter()

    async def one(http: sf.Http) -> None:
        try:
            status, out = await http.request("POST", "/api/v1/jobs", body, headers)
            if status in (200, 201):
                ids.append(json.loads(out)["job_id"])
            else:
                errors[f"submit {status}"] += 1
        finally:
            pool.put_nowait(http)

    tasks = []
    start, n = time.monotonic(), int(rate * duration)
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(await pool.get())))
    await asyncio.gather(*tasks)
    achieved = n / (time.monotonic() - start)
    while not pool.empty():
        pool.get_nowait().close()
    if errors:
        print(f"    submit errors: {dict(errors)}")
    return ids, achieved


def job_times(db: str, ids: list[str]) -> dict[str, tuple[float, float | None]]:
    """``{job id: (created_at, started_at)}`` read from the database."""
    sql = "SELECT id, created_at, started_at FROM jobs"
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as c:
            rows = c.execute(sql).fetchall()
    else:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            rows = c.execute(sql).fetchall()
    wanted = set(ids)
    return {r[0]: (r[1], r[2]) for r in rows if r[0] in wanted}


# -- one configuration ------------------------------------------------------------------


class Config(NamedTuple):
    """A database and a number of replicas."""

    db: str
    replicas: int


class Options(NamedTuple):
    """Command-line knobs."""

    runners: int
    backlog: int
    warm: float
    latency_s: float
    latency_load: float
    raw_window: float
    server_env: dict[str, str]
    measurements: dict[str, Any]


def fleet_config(cfg: Config, opts: Options, work: Path, procs: sf.Processes,
                 pg: sf.Postgres | None, server_argv: list[str] | None = None,
                 name: str = "") -> dict[str, Any]:
    """Set up the state, start the replicas, enrol the runners, measure (1) and (2)."""
    home = work / (name or f"{cfg.db}-{cfg.replicas}")
    extra, db = {}, str(home / "stockade.db")
    if cfg.db == "postgresql":
        assert pg is not None
        db = pg.new_database(f"bench_{name or cfg.replicas}_{os.getpid()}".replace("-", "_"))
        extra = {"STOCKADE_DATABASE_URL": db}
    env = sf.base_env(home, {**extra, **opts.server_env})
    t = time.monotonic()
    state = sf.setup_state(env, opts.runners, opts.backlog)
    print(f"  state ready with {opts.backlog} queued jobs in {time.monotonic() - t:.1f} s")
    servers = []
    for i in range(cfg.replicas):
        argv = None if server_argv is None else [*server_argv, str(home / f"server-{i}.prof"),
                                                  "server", "--listen", "127.0.0.1:0"]
        servers.append(sf.start_server(procs, env, home / f"server-{i}.log", argv))
    urls = [url for _, url in servers]
    t = time.monotonic()
    runners = sf.enrol_all(urls, state["enrol"], opts.measurements)
    print(f"  {len(runners)} runners enrolled in {time.monotonic() - t:.1f} s")
    out = asyncio.run(measure(cfg, opts, runners, urls, state["token"], db,
                              [p.pid for p, _ in servers], pg.postmaster if pg else None))
    t = time.monotonic()
    for p, _ in servers:
        procs.stop(p)
    print(f"  servers stopped in {time.monotonic() - t:.1f} s")
    return out


async def measure(cfg: Config, opts: Options, runners: list[sf.Runner], urls: list[str],
                  token: str, db: str, server_pids: list[int], postmaster: int | None
                  ) -> dict[str, Any]:
    """(1) drain the backlog, (2) the latency at a fixed submit rate."""
    load, cpu, sampling = Load(), Cpu(server_pids, postmaster), asyncio.Event()
    sampler = asyncio.create_task(cpu.run(sampling))
    await asyncio.sleep(0.3)
    start = time.time()
    tasks = [asyncio.create_task(runner_loop(r, load, sf.host_address(i)))
             for i, r in enumerate(runners)]
    try:
        sustained = opts.backlog - 2 * len(runners)
        await wait_until(lambda: len(load.claims) >= sustained, 300)
        t0, t1 = start + opts.warm, load.claims[sustained - 1][0]
        if t1 - t0 < 1.0:  # drained (nearly) within the warm-up: the first fifth is the warm-up
            t0 = load.claims[sustained // 5][0]
            print(f"  (the backlog drained within the {opts.warm:.0f} s warm-up: its first "
                  "fifth taken as the warm-up instead; a larger --backlog measures longer)")
        in_window = sum(1 for t, _ in load.claims[:sustained] if t >= t0)
        rate = in_window / (t1 - t0)
        used = cpu.between(t0, t1)
        await wait_until(lambda: len(load.claims) >= opts.backlog, 60)
        await asyncio.sleep(1.0)  # every runner back in its long poll
        print(f"  backlog drained in {time.time() - start:.1f} s")
        offered = min(TARGET_CLAIMS_PER_S, max(5.0, round(rate * opts.latency_load)))
        before = len(load.claims)
        ids, achieved = await submitter(urls, token, offered, opts.latency_s)
        await wait_until(lambda: len(load.claims) - before >= len(ids), 30)
        await asyncio.sleep(1.0)  # then an idle fleet: every runner long-polls, no job
        idle_from = time.time()
        await asyncio.sleep(3.0)
        idle = cpu.between(idle_from, time.time())
    finally:
        load.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sampling.set()
        await sampler
    arrival = {job: t for t, job in load.claims}
    times = job_times(db, ids)
    first = min((c for c, _ in times.values()), default=0.0) + 1.0  # warm-up excluded
    lat = [(arrival[j] - c) * 1000 for j, (c, _) in times.items() if c >= first and j in arrival]
    server_side = [(s - c) * 1000 for j, (c, s) in times.items() if c >= first and s]
    n = max(in_window, 1)
    return {"db": cfg.db, "replicas": cfg.replicas, "runners": len(runners),
            "claims_per_s": round(rate, 1), "window_s": round(t1 - t0, 2),
            "jobs": opts.backlog + len(ids), "backlog": opts.backlog,
            "offered_per_s": offered, "submitted_per_s": round(achieved, 1),
            "latency_jobs": len(lat), "unclaimed": len(ids) - len(lat) - sum(
                1 for c, _ in times.values() if c < first),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "started_p50_ms": pct(server_side, 0.5),
            "started_p99_ms": pct(server_side, 0.99),
            "cpu_ms_per_claim": {k: round(v * 1000 / n, 2) for k, v in used.items()
                                 if k != "seconds"},
            "machine_busy_cores": round(used["machine"] / max(used["seconds"], 1e-9), 2),
            "idle_server_cores": round(idle["server"] / max(idle["seconds"], 1e-9), 3),
            "idle_postgres_cores": round(idle["postgres"] / max(idle["seconds"], 1e-9), 3),
            "other_load_cores": round(max(0.0, used["machine"] - used["server"] - used["postgres"]
                                          - used["client"]) / max(used["seconds"], 1e-9), 2),
            "errors": dict(load.errors), "requests": dict(load.requests)}


# -- submit -> first step on a real runner agent ---------------------------------------

FIRST_STEP_SPEC = "name: first-step\nsteps:\n  - {name: t, run: 'date +%s.%N'}\n"


def first_step(work: Path, procs: sf.Processes, n: int, server_env: dict[str, str],
               traced: bool = False) -> dict[str, Any]:
    """(5): 2 warm-up jobs, then ``n`` sequential jobs on an idle runner agent (with
    ``traced``, the agent stamps its phases: :data:`_TRACED_AGENT`)."""
    import httpx

    name = "first-step-traced" if traced else "first-step"
    home, agent_home = work / name, work / f"{name}-agent"
    env = sf.base_env(home, server_env)
    state = sf.setup_state(env, 1, 0)
    server, url = sf.start_server(procs, env, home / "server.log")
    agent_log = work / f"{name}-agent.log"
    command = ["runner", "start", "--server", url, "--enrol-token", state["enrol"][0],
               "--name", "bench-agent"]
    agent = procs.start([sf.PYTHON, "-c", _TRACED_AGENT, *command] if traced
                        else [sf.STOCKADE, *command], sf.base_env(agent_home), agent_log)
    try:
        deadline = time.monotonic() + 60
        while "waiting for jobs" not in agent_log.read_text(errors="replace"):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the runner agent did not start: "
                                   f"{agent_log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        lat, claim, step, marks = [], [], [], []
        with httpx.Client(base_url=url, timeout=30,
                          headers={"Authorization": f"Bearer {state['token']}"}) as client:
            for i in range(n + 2):
                time.sleep(0.5)  # the agent is back in its long poll
                sent = time.time()
                job = client.post("/api/v1/jobs", json={"spec": FIRST_STEP_SPEC,
                                                        "trust": "trusted"}).json()["job_id"]
                ran, created, started = wait_job(client, home / "stockade.db", job)
                if i >= 2:
                    lat.append((ran - sent) * 1000)
                    claim.append((started - created) * 1000)
                    step.append((ran - started) * 1000)
                    marks.append((sent, created, started, ran))
    finally:
        procs.stop(agent, timeout=15)
        procs.stop(server)
        tidy_runtime(agent_home)
    if traced:
        print_trace(agent_log.read_text(errors="replace"), marks)
    p50 = pct(lat, 0.5)
    return {"metric": "submit_to_first_step", "jobs": n, "p50_ms": p50,
            "p99_ms": pct(lat, 0.99), "created_to_claimed_p50_ms": pct(claim, 0.5),
            "claimed_to_first_step_p50_ms": pct(step, 0.5),
            "target_met": p50 is not None and p50 < TARGET_FIRST_STEP_P50_MS}


def wait_job(client: Any, db: Path, job: str) -> tuple[float, float, float]:
    """Wait for the job to finish; ``(time its step printed, created_at, started_at)``."""
    import re

    deadline = time.monotonic() + 60
    while True:
        status = client.get(f"/api/v1/jobs/{job}").json().get("status")
        if status in ("succeeded", "failed", "error", "denied"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job} did not finish ({status})")
        time.sleep(0.02)
    if status != "succeeded":
        raise RuntimeError(f"job {job} ended {status}")
    log = client.get(f"/api/v1/jobs/{job}/log").content
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        created, started = c.execute("SELECT created_at, started_at FROM jobs WHERE id = ?",
                                     (job,)).fetchone()
    m = re.search(rb"\b(\d{10}\.\d{6,9})\b", log)
    if not m:
        raise RuntimeError(f"job {job}: no time in its log {log[:300]!r}")
    return float(m.group(1)), created, started


# `stockade runner start` with its phases stamped on stderr (wrapped here, not in stockade)
_TRACED_AGENT = r"""
import functools, sys, time
from stockade.runner import agent, attempt, logs, remote, secrets
from stockade.sandbox import bwrap, cgroups
def traced(cls, name):
    f = getattr(cls, name)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.time()
        try:
            return f(*a, **k)
        finally:
            sys.stderr.write(f"TRACE {cls.__name__}.{name} {t:.6f} {time.time():.6f}\n")
    setattr(cls, name, w)
for cls, name in [(remote.RemoteControl, "claim"), (agent.Agent, "_run"),
                  (logs.JobLog, "__init__"), (attempt.Attempt, "__init__"),
                  (agent.Agent, "_workspace"), (attempt.Attempt, "_prepare"),
                  (secrets.JobSecrets, "__init__"), (bwrap.BwrapBackend, "prepare"),
                  (bwrap.BwrapSandbox, "setup"), (cgroups.JobCgroup, "create"),
                  (bwrap.BwrapSandbox, "run"), (attempt.Attempt, "_teardown"),
                  (remote.RemoteControl, "complete")]:
    traced(cls, name)
from stockade.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def print_trace(log: str, marks: list[tuple[float, float, float, float]]) -> None:
    """Per job, from the agent's stamps: where submit -> first step goes (medians)."""
    import re

    spans = [(m[1], float(m[2]), float(m[3])) for m in re.finditer(
        r"TRACE (\S+) ([\d.]+) ([\d.]+)", log)]
    phases: dict[str, list[float]] = {}

    def add(name: str, ms: float) -> None:
        phases.setdefault(name, []).append(ms)

    for sent, created, started, ran in marks:
        mine = [s for s in spans if started - 0.5 < s[2] and s[1] < ran + 0.01]
        first = {name: (a, b) for name, a, b in reversed(mine)}
        got = first.get("RemoteControl.claim", (0.0, started))[1]
        run = first.get("BwrapSandbox.run", (ran, ran))[0]
        add("submit sent -> created_at (API, admission, insert)", (created - sent) * 1000)
        add("created_at -> claim transaction (started_at)", (started - created) * 1000)
        add("started_at -> claim returned in the agent", (got - started) * 1000)
        for name, (a, b) in first.items():
            if name not in ("RemoteControl.claim", "RemoteControl.complete", "Agent._run",
                            "Attempt._teardown") and a < ran:
                add(f"  {name} (duration)", (b - a) * 1000)
        add("claim returned -> sandbox.run called", (run - got) * 1000)
        add("sandbox.run called -> the step printed its time", (ran - run) * 1000)
    print("  submit -> first step, medians per phase (ms):")
    for name, values in phases.items():
        print(f"    {pct(values, 0.5) or 0.0:8.1f}  {name}")


def tidy_runtime(home: Path) -> None:
    """Remove the runtime directory the agent's installation made (if no job is left in
    it), as the test suite does."""
    try:
        installation = (home / "installation-id").read_text().strip()
    except OSError:
        return
    runtime = Path("/run/stockade") / installation
    if installation.isalnum() and runtime.is_dir() and all(
            p.name.startswith((".", "etc-")) for p in runtime.iterdir()):
        shutil.rmtree(runtime, ignore_errors=True)


# -- profile ----------------------------------------------------------------------------

# A stockade command with cProfile in every thread (CPU time of each thread, or wall-clock
# time), the merged stats written when it ends. `stockade server` ends on SIGTERM: uvicorn shuts
# down gracefully, then re-raises the signal, which ends the server here.
_PROFILED = r"""
import cProfile, pstats, signal, sys, threading, time
timer = time.thread_time if sys.argv[1] == "cpu" else time.perf_counter
out, profiles = sys.argv[2], [cProfile.Profile(timer)]
def stop(signum, frame):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, stop)
def per_thread(frame, event, arg):
    p = cProfile.Profile(timer)
    profiles.append(p)
    p.enable()
threading.setprofile(per_thread)
profiles[0].enable()
from stockade.cli.main import main
try:
    main(sys.argv[3:])
finally:
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        stats.add(p)
    stats.dump_stats(out)
"""


# The control-plane core without HTTP: one thread claims and completes the backlog through
# FleetService in batches of CORE_BATCH works (about what a replica's store thread takes at
# once under load), each batch in one store transaction as the server runs it, authenticated
# once by a real session token, each completion claiming the next job
CORE_BATCH = 9
_CORE = r"""
import functools, json, sys, time
from stockade.api.protocol import Completion, JobStatus
from stockade.cli.context import fleet_service, open_control
from stockade.control.fleet import ClaimWork, CompleteWork
settings, control = open_control()
fleet = fleet_service(settings, control)
caller = fleet.authenticate(sys.argv[1])
batch = int(sys.argv[2])

def serve(works):
    ok, out = control.store.batched([functools.partial(fleet.serve, works)])[0]
    if not ok:
        raise out
    return out

n, cpu, wall = 0, time.process_time(), time.perf_counter()
held = [a for a in serve([ClaimWork(caller)] * batch) if a is not None]
while held:
    works = [CompleteWork(caller, Completion(a.job_id, a.attempt, a.runner_id,
                                             JobStatus.SUCCEEDED, None, 0, (), (), 0.0),
                          True, lambda: False) for a in held]
    held = [c.next for c in serve(works) if c.next is not None]
    n += len(works)
print(json.dumps({"claims": n, "cpu_s": time.process_time() - cpu,
                  "wall_s": time.perf_counter() - wall}))
"""

# cProfile with a per-thread CPU clock charges lock.acquire with far more than the process
# used when the pool threads block in psycopg (more than the run's CPU): shown, not counted
UNCOUNTED = "lock.acquire (not counted: a profiler artifact with psycopg)"
CATEGORIES = (  # (name, substrings of "file:line(function)"), the first that matches
    ("socket send/recv syscalls", ("'_socket.socket'",)),
    (UNCOUNTED, ("method 'acquire' of '_thread.lock'",)),
    ("DB: sqlite3/psycopg calls", ("sqlite3.", "/psycopg", "psycopg_pool", "psycopg.")),
    ("audit chain (hash, head file, flock)", ("stockade/audit/", "fcntl.flock")),
    ("stockade store (SQL strings, rows, tx)", ("stockade/store/",)),
    ("stockade api/control/fleet code", ("stockade/",)),
    ("HTTP/1.1 parsing (httptools, uvicorn)", ("httptools", "/uvicorn/")),
    ("FastAPI/pydantic (routing, params, validation, JSON)", ("/fastapi/", "/pydantic",
                                                              "pydantic_core")),
    ("Starlette/anyio (middleware, Request, thread-pool hops)", ("/starlette/", "/anyio/",
                                                                 "concurrent/futures")),
    ("asyncio event loop, tasks, thread wake-ups", ("/asyncio/", "_asyncio",
                                                    "'_contextvars", "threading.py",
                                                    "_thread.", "queue.py", "selectors")),
    ("json, hashlib, other stdlib", ("/json/", "_json", "_hashlib", "/python3.11/")),
)


def _category(key: str) -> str:
    return next((n for n, subs in CATEGORIES if any(x in key for x in subs)), "other")


def print_profile(files: list[Path], claims: int) -> dict[str, float]:
    """CPU self time by category in ms per claim+complete cycle; a builtin's time goes to its
    callers' categories (in proportion to what each caller spent in it)."""
    import pstats

    stats = pstats.Stats(*map(str, files)).stats  # type: ignore[attr-defined]
    table: Counter[str] = Counter()
    for (file, line, func), (_, _, tottime, _, callers) in stats.items():
        key = f"{file}:{line}({func})"
        own = _category(key)
        if file != "~" or own != "other" or not callers:
            table[own] += tottime
            continue
        shares = {c: v[2] for c, v in callers.items()}
        whole = sum(shares.values()) or 1.0
        for (cf, cl, cfn), share in shares.items():
            table[_category(f"{cf}:{cl}({cfn})")] += tottime * share / whole
    total = sum(v for k, v in table.items() if k != UNCOUNTED)
    print(f"\n  profile of the server (CPU self time of every thread; cProfile slows the "
          f"server ~3x, call-heavy code most), {claims} claim+complete cycles:")
    for name, seconds in table.most_common():
        share = "     -" if name == UNCOUNTED else f"{seconds / total * 100:5.1f}%"
        print(f"    {seconds * 1000 / claims:7.3f} ms/cycle {share}  {name}")
    top = sorted(((v[2], f"{Path(f).name}:{ln}({fn})") for (f, ln, fn), v in stats.items()),
                 reverse=True)[:12]
    print("  top functions by CPU self time:")
    for seconds, key in top:
        print(f"    {seconds * 1000 / claims:7.3f} ms/cycle  {key[:100]}")
    counted = {("_asyncio.py", "_report_result"): "thread-pool hops (anyio jobs done)",
               ("h11_impl.py", "handle_events"): "h11 event batches (uvicorn)",
               ("fleet.py", "authenticate"): "runner session checks (gate, a hop each)",
               ("fleet.py", "serve"): "claims and completions served (FleetService.serve)",
               ("pgsets.py", "claim_attempts"): "claim sets (PostgreSQL)",
               ("pgsets.py", "finish_attempts"): "completion sets (PostgreSQL)",
               ("fleet.py", "claim_attempt"): "claim write transactions (SQLite)",
               ("fleet.py", "finish_attempt"): "completion write transactions (SQLite)",
               ("sql.py", "revoke_leases"): "lease revocation write transactions (store)",
               ("sql.py", "_append_events"): "audit appends (batches)",
               ("sql.py", "get_job"): "job reads (store.get_job)",
               ("v2.py", "validate"): "pydantic validations (FastAPI ModelField.validate)"}
    print("  calls per cycle (synchronous functions only: cProfile counts a coroutine once per "
          "resumption):")
    for (file, _, func), v in sorted(stats.items(), key=lambda i: i[0][2]):
        what = counted.get((Path(file).name, func))
        if what and ("stockade" in file or "site-packages" in file):
            print(f"    {v[1] / claims:6.2f}  {what}")
    return {k: round(v * 1000 / claims, 3) for k, v in table.items()}


async def hammer(url: str, path: str, clients: int, seconds: float, pid: int
                 ) -> tuple[float, float]:
    """``clients`` connections requesting ``path`` for ``seconds``: requests/s and the
    server's CPU ms per request."""
    stop, count = asyncio.Event(), [0]

    async def one(i: int) -> None:
        http = sf.Http(url, sf.host_address(i))
        while not stop.is_set():
            await http.request("GET", path)
            count[0] += 1
        http.close()

    tasks = [asyncio.create_task(one(i)) for i in range(clients)]
    await asyncio.sleep(0.5)
    n0, c0, t0 = count[0], sf.cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    n1, c1, t1 = count[0], sf.cpu_seconds(pid), time.monotonic()
    stop.set()
    await asyncio.gather(*tasks)
    return (n1 - n0) / (t1 - t0), (c1 - c0) * 1000 / max(n1 - n0, 1)


def profile(db: str, opts: Options, work: Path, procs: sf.Processes,
            pg: sf.Postgres | None) -> dict[str, Any]:
    """Where a one-replica server spends its CPU: the HTTP floor (/healthz), the control-plane
    core without HTTP, and a cProfile of the dispatch run (1) and (2)."""
    out: dict[str, Any] = {"metric": "dispatch_profile", "db": db, "replicas": 1}
    home, extra = work / f"floor-{db}", {}
    if pg is not None:
        extra = {"STOCKADE_DATABASE_URL": pg.new_database(f"bench_floor_{os.getpid()}")}
    env = sf.base_env(home, {**extra, **opts.server_env})
    state = sf.setup_state(env, 1, 1000)
    server, url = sf.start_server(procs, env, home / "server.log")
    rate, cpu = asyncio.run(hammer(url, "/healthz", opts.runners, 3.0, server.pid))
    print(f"  HTTP floor: GET /healthz (no auth, no database), {opts.runners} connections: "
          f"{rate:.0f} requests/s, server CPU {cpu:.2f} ms/request")
    out.update(healthz_per_s=round(rate), healthz_cpu_ms=round(cpu, 3))
    before = sf.cpu_seconds(server.pid)
    ids, achieved = asyncio.run(submitter([url], state["token"], SUBMIT_RATE, 4.0))
    per_submit = (sf.cpu_seconds(server.pid) - before) * 1000 / max(len(ids), 1)
    print(f"  submissions: POST /api/v1/jobs (a trivial spec) at {achieved:.0f}/s: server CPU "
          f"{per_submit:.2f} ms/submission")
    out.update(submit_cpu_ms=round(per_submit, 3))
    runner = sf.enrol_all([url], state["enrol"], opts.measurements)[0]
    procs.stop(server)
    done = subprocess.run([sf.PYTHON, "-c", _CORE, runner.token, str(CORE_BATCH)], env=env,
                          cwd=sf.ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"core loop failed: {done.stderr[-1500:]}")
    core = json.loads(done.stdout.strip().splitlines()[-1])
    per = core["cpu_s"] * 1000 / max(core["claims"], 1)
    print(f"  control-plane core without HTTP (FleetService.serve, batches of {CORE_BATCH}, "
          f"one thread): {core['claims'] / core['wall_s']:.0f} cycles/s, CPU {per:.2f} "
          "ms/cycle")
    out.update(core_cycles_per_s=round(core["claims"] / core["wall_s"]),
               core_cpu_ms_per_cycle=round(per, 3))
    r = fleet_config(Config(db, 1), opts._replace(backlog=min(opts.backlog, PROFILED_BACKLOG)),
                     work, procs, pg, server_argv=[sf.PYTHON, "-c", _PROFILED, "cpu"],
                     name=f"profiled-{db}")
    print(f"  under the profiler: {r['claims_per_s']} claims/s, latency p50 {r['p50_ms']} ms "
          f"p99 {r['p99_ms']} ms")
    out["cpu_ms_per_cycle_profiled"] = print_profile(
        sorted((work / f"profiled-{db}").glob("server-*.prof")), r["jobs"])
    return out


# -- main -------------------------------------------------------------------------------


def row(r: dict[str, Any]) -> str:
    """One line of the table."""
    c = r["cpu_ms_per_claim"]
    return (f"{r['db']:<10} {r['replicas']:>2} {r['claims_per_s']:>8.1f} "
            f"{r['raw_claims_per_s']:>7.0f} {r['ratio_to_raw']:>6.3f} {r['offered_per_s']:>5.0f} "
            f"{r['p50_ms'] or 0:>7.1f} {r['p99_ms'] or 0:>7.1f} {r['started_p50_ms'] or 0:>7.1f} "
            f"{c['server']:>6.2f} {c['server_loop']:>5.2f} {c['postgres']:>5.2f} "
            f"{c['client']:>5.2f} {r['idle_server_cores'] + r['idle_postgres_cores']:>5.2f} "
            f"{r['other_load_cores']:>5.2f}  {'yes' if r['target_met'] else 'no'}")


def main() -> None:
    """Every configuration, then the runner agent's submit -> first step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=50)
    parser.add_argument("--backlog", type=int, default=12000,
                        help="jobs queued beforehand for the capacity drain (default 12000)")
    parser.add_argument("--warm", type=float, default=2.0, help="warm-up seconds excluded")
    parser.add_argument("--latency-seconds", type=float, default=6.0)
    parser.add_argument("--latency-load", type=float, default=0.5,
                        help="submit rate of (2) as a fraction of (1)'s claims/s")
    parser.add_argument("--raw-window", type=float, default=3.0)
    parser.add_argument("--first-step-jobs", type=int, default=20)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the servers (e.g. PYTHONPATH=DIR "
                        "holding uvloop and httptools, which uvicorn then picks)")
    parser.add_argument("--only", choices=("sqlite", "postgresql", "first-step", "none"),
                        help="run only these configurations (none: only --profile)")
    parser.add_argument("--profile", action="append", default=[],
                        choices=("sqlite", "postgresql", "first-step"),
                        help="also profile a 1-replica server on this database (about a "
                        "minute each; may be given twice)")
    args = parser.parse_args()
    opts = Options(args.runners, args.backlog, args.warm, args.latency_seconds,
                   args.latency_load, args.raw_window,
                   dict(v.split("=", 1) for v in args.server_env), {})
    if os.geteuid() != 0:
        sys.exit("run as root (the runner agent's sandbox; the PostgreSQL cluster's owner)")

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    configs = [Config(db, n) for db in ("sqlite", "postgresql") if args.only in (None, db)
               for n in (1, 2)]
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-dispatch-"))
    procs = sf.Processes()
    results: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        if configs or any(p != "first-step" for p in args.profile):
            measured = work / "measure-home"
            opts = opts._replace(measurements=sf.measurements(sf.base_env(measured)))
            tidy_runtime(measured)
        with contextlib.ExitStack() as stack:
            pg = stack.enter_context(sf.postgres()) if any(
                c.db == "postgresql" for c in configs) or "postgresql" in args.profile else None
            for cfg in configs:
                results.append(run_config(cfg, opts, work, procs, pg))
            for db in (x for x in args.profile if x != "first-step"):
                print(f"== where the time goes: {db}, 1 replica")
                extra.append(profile(db, opts, work, procs, pg if db == "postgresql" else None))
        if args.only in (None, "first-step"):
            print(f"== submit -> first step: {args.first_step_jobs} jobs, one runner agent")
            extra.append(first_step(work, procs, args.first_step_jobs, opts.server_env))
        if "first-step" in args.profile:
            print("== where the time goes: submit -> first step, the agent's phases stamped")
            t = first_step(work, procs, args.first_step_jobs, opts.server_env, traced=True)
            print(f"  (traced run: p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms)")
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        raise
    finally:
        with sf.shielded():
            procs.stop_all()
            shutil.rmtree(work, ignore_errors=True)
    report(results, extra, time.monotonic() - began)


def run_config(cfg: Config, opts: Options, work: Path, procs: sf.Processes,
               pg: sf.Postgres | None) -> dict[str, Any]:
    """The raw baseline, then the fleet, of one configuration."""
    print(f"== {cfg.db}, {cfg.replicas} replica(s), {opts.runners} runners")
    raw = raw_baseline(cfg, opts, work, pg)
    r = fleet_config(cfg, opts, work, procs, pg)
    r["raw_claims_per_s"] = round(raw, 1)
    r["ratio_to_raw"] = round(r["claims_per_s"] / raw, 4) if raw else None
    r["target_met"] = (r["claims_per_s"] >= TARGET_CLAIMS_PER_S and r["p99_ms"] is not None
                       and r["p99_ms"] < TARGET_P99_MS)
    print(f"  {r['claims_per_s']} claims/s (raw {raw:.0f}/s); latency at "
          f"{r['offered_per_s']} jobs/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms; "
          f"errors: {r['errors'] or 'none'}")
    return r


def report(results: list[dict[str, Any]], extra: list[dict[str, Any]], took: float) -> None:
    """The table, then the RESULT lines."""
    print("\n(1) claims/s draining a backlog; (2) claim latency (created_at -> claim response "
          "at the runner) at a submit rate of half that; CPU ms per claim+complete cycle of "
          "the servers (loop: their event-loop threads), PostgreSQL and the load generator; "
          "idle: cores the servers and PostgreSQL use while every runner long-polls an empty "
          "queue; other: cores other processes used meanwhile")
    print("db       rep claims/s   raw/s  ratio sub/s p50(ms) p99(ms) st50(ms) "
          "srv-ms loop  pg-ms gen-ms  idle other target")
    for r in results:
        print(row(r))
    for e in extra:
        if e["metric"] == "submit_to_first_step":
            print(f"submit -> first step on an idle runner agent ({e['jobs']} jobs): p50 "
                  f"{e['p50_ms']} ms, p99 {e['p99_ms']} ms (created -> claimed p50 "
                  f"{e['created_to_claimed_p50_ms']} ms, claimed -> step p50 "
                  f"{e['claimed_to_first_step_p50_ms']} ms); target p50 < "
                  f"{TARGET_FIRST_STEP_P50_MS:.0f} ms: "
                  f"{'met' if e['target_met'] else 'not met'}")
    print(f"(took {took:.0f} s)")
    for r in [*results, *extra]:
        print("RESULT " + json.dumps(r), flush=True)


def raw_baseline(cfg: Config, opts: Options, work: Path, pg: sf.Postgres | None) -> float:
    """The raw claim loop on a fresh database of the configuration's kind."""
    if cfg.db == "postgresql":
        assert pg is not None
        url = pg.new_database(f"bench_raw_{cfg.replicas}_{os.getpid()}")
        rate = sf.raw_postgres(url, opts.runners, 0.5, opts.raw_window)
    else:
        rate = sf.raw_sqlite(work / f"raw-{cfg.replicas}.db", opts.runners, 0.5, opts.raw_window)
    print(f"  raw claim loop, {opts.runners} threads: {rate:.0f} claims/s")
    return rate


if __name__ == "__main__":
    main()
