"""Hostile jobs against host processes, and processes that try to outlive their job."""

from __future__ import annotations

import resource

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)


def test_host_processes_are_invisible(hostile, host) -> None:
    run = hostile("""
        ls /proc | grep -E '^[0-9]+$' | wc -l
        test -e /proc/$HOST_PID && echo SEES-HOST-PID
        for p in /proc/[0-9]*; do cat $p/cmdline 2>/dev/null | tr '\\0' ' '; echo; done
        echo DONE
    """)
    assert "DONE" in run.log and "SEES-HOST-PID" not in run.log
    assert "sleep 3600" not in run.log


def test_kill_everything_spares_the_host(hostile, host) -> None:
    run = hostile("kill -9 $HOST_PID 2>/dev/null && echo KILLED; kill -9 -1; echo AFTER")
    assert "KILLED" not in run.log
    assert host.victim.poll() is None


def test_ptrace_of_a_host_process_fails(hostile) -> None:
    run = hostile("""
        python3 - <<'PY'
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.ptrace(16, int(os.environ["HOST_PID"]), 0, 0)  # PTRACE_ATTACH
        print("ATTACH", r, os.strerror(ctypes.get_errno()))
        PY
    """)
    assert "ATTACH -1 No such process" in run.log


def test_daemonized_processes_do_not_survive(hostile) -> None:
    run = hostile("""
        setsid sh -c 'trap "" TERM HUP; sleep 300' </dev/null >/dev/null 2>&1 &
        nohup sleep 300 >/dev/null 2>&1 &
        ( ( sleep 300 & ) & )
        echo SPAWNED
    """)
    assert run.rc == 0 and "SPAWNED" in run.log  # the guard checks that none survived


def test_timeout_kills_the_whole_tree(hostile) -> None:
    run = hostile("""
        for i in 1 2 3; do setsid sh -c 'trap "" TERM INT HUP; while :; do sleep 1; done' & done
        trap '' TERM INT
        while :; do sleep 1; done
    """, step="    timeout: 2s\n")
    assert run.result["failure_reason"] == "timeout"
    assert run.elapsed < 30


def test_sandbox_processes_are_not_host_root(hostile, host) -> None:
    run = hostile("sleep 1; echo DONE")
    assert "DONE" in run.log
    uids = host.sampler.uids(run.result["job_id"])
    assert uids, "the sampler saw no sandboxed process"
    assert 0 not in uids


def test_closing_the_output_does_not_escape_the_timeout(hostile) -> None:
    run = hostile("exec >/dev/null 2>&1 </dev/null; trap '' TERM; sleep 300",
                  step="    timeout: 2s\n")
    assert run.result["failure_reason"] == "timeout"
    assert run.elapsed < 30


def test_core_dumps_are_disabled(hostile) -> None:
    before = resource.getrlimit(resource.RLIMIT_CORE)
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    resource.setrlimit(resource.RLIMIT_CORE, unlimited)  # the runner itself may dump cores
    try:
        run = core_probe(hostile)
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)
    assert "core limit: 0 hard 0" in run.log
    assert "RAISED" not in run.log and "NO-CORE" in run.log


def core_probe(hostile):
    return hostile("""
        echo "core limit: $(ulimit -c) hard $(ulimit -H -c)"
        ulimit -c unlimited 2>/dev/null && echo RAISED
        sh -c 'kill -SEGV $$' || true
        ls core* 2>/dev/null || echo NO-CORE
    """)


def test_a_job_cannot_forge_stockade_log_lines(hostile) -> None:
    run = hostile("echo '==> step probe succeeded in 0.01s'; printf '\\n12:00:00 ==> job x: ok'")
    forged = [line for line in run.log.splitlines() if "0.01s" in line or "job x: ok" in line]
    assert forged and all(line[9:].startswith("| ") for line in forged)
