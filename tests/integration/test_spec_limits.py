"""Spec limits through the real CLI: hostile specs exit 2 quickly with a short report, and
operator ceilings refuse what the runner does not allow (``stockade validate`` and ``run``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.specs import STEPS, VALID, alias_bomb

REPRODUCERS = {
    "aliases-7": (alias_bomb(7), "anchors (&a) are not allowed"),
    "aliases-9": (alias_bomb(9), "anchors (&a) are not allowed"),
    "memory-400-digits": (VALID + "resources: {memory: " + "9" * 400 + "}\n",
                          "a number of 400 characters is too long"),
    "memory-400-digits-Gi": (VALID + "resources: {memory: '" + "9" * 400 + "Gi'}\n",
                             "has more than 15 digits"),
    "complex-key": (VALID + "env:\n  ? [k1, k2]\n  : v\n", "a mapping key must be a plain"),
    "int-5000-digits": (VALID + "resources: {pids: " + "9" * 5000 + "}\n",
                        "a number of 5000 characters"),
    "nesting-500": (VALID + "env: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
                    "nested deeper than 16 levels"),
    "name-newline": ('name: "build\\n"\n' + STEPS, "name: 'build\\n' is not a valid name"),
    "memory-1": (VALID + "resources: {memory: 1}\n", "resources.memory: 1 is too small"),
    "memory-50-digits": (VALID + "resources: {memory: '" + "9" * 50 + "'}\n", "digits"),
    "tmp-1.8EB": (VALID + "resources: {tmp: 1800000000000000000}\n", "is too large"),
    "float-tag": (VALID + "env: {A: !!float abc}\n", "the tag !!float is not allowed"),
    "binary-int-without-digits": (VALID + "env: {A: 0b_}\n", "'0b_' is not a valid number"),
    "1000-errors": (VALID + "env:\n" + "".join(f"  K{i}: {i}\n" for i in range(1000)),
                    "... and 980 more problems"),
}


def refused_quickly(home: Path, path: Path, *, seconds: float = 10, **env: str) -> str:
    start = time.monotonic()
    proc = run_cli(home, "validate", str(path), timeout=60, **env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[:2000]
    assert elapsed < seconds, elapsed
    assert len(proc.stderr.encode()) < 10_000, len(proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return proc.stderr


@pytest.mark.parametrize("name", sorted(REPRODUCERS))
def test_each_reproducer_exits_2_quickly_with_a_short_report(stockade_home: Path, tmp_path: Path,
                                                             name: str) -> None:
    text, expected = REPRODUCERS[name]
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    stderr = refused_quickly(stockade_home, spec)
    assert expected in stderr, stderr


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_special_files_are_refused_without_hanging(stockade_home: Path, tmp_path: Path,
                                                   kind: str) -> None:
    path = {"fifo": tmp_path / "job.yaml", "directory": tmp_path,
            "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    stderr = refused_quickly(stockade_home, path)
    assert "not a regular file" in stderr


def test_ceilings_are_named_by_validate_and_raised_by_the_operator(stockade_home: Path,
                                                                   tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(VALID + "resources: {memory: 1Ti, pids: 32768}\n")
    stderr = refused_quickly(stockade_home, spec)
    assert ("resources.memory: 1Ti is above this runner's ceiling of 16Gi (max_memory_bytes, "
            "STOCKADE_MAX_MEMORY); ask for less or have the operator raise it") in stderr
    assert "resources.pids: 32768 is above this runner's ceiling of 4096" in stderr

    spec.write_text(VALID + "resources: {memory: 64Gi}\n")
    ok = run_cli(stockade_home, "validate", str(spec), STOCKADE_MAX_MEMORY="64Gi")
    assert ok.returncode == 0, ok.stderr
    stderr = refused_quickly(stockade_home, spec)  # the default ceiling again
    assert "ceiling of 16Gi" in stderr
    spec.write_text(VALID + "resources: {memory: 65Gi}\n")
    stderr = refused_quickly(stockade_home, spec, STOCKADE_MAX_MEMORY="64Gi")
    assert "resources.memory: 65Gi is above this runner's ceiling of 64Gi" in stderr


def test_run_refuses_a_spec_above_a_ceiling_before_anything_runs(stockade_home: Path,
                                                                 tmp_path: Path) -> None:
    spec, ws = tmp_path / "job.yaml", tmp_path / "ws"
    ws.mkdir()
    spec.write_text("name: greedy\nresources: {timeout: 2h}\nsteps:\n"
                    "  - {name: a, run: 'touch /workspace/ran', timeout: 2h}\n")
    proc = run_cli(stockade_home, "run", str(spec), "--workspace", str(ws), "--json",
                   STOCKADE_MAX_TIMEOUT="1h")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "resources.timeout: 2h is above this runner's ceiling of 1h (max_timeout_s" \
        in proc.stderr
    assert "steps[0].timeout: 2h is above" in proc.stderr
    assert "greedy" not in run_cli(stockade_home, "jobs").stdout
