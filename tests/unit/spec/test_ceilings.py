"""Operator ceilings: a spec may narrow its limits, never widen them past the runner's."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.config import Settings, load_settings
from stockade.errors import SpecError
from stockade.spec import ceilings
from stockade.spec.parse import parse_spec

GiB = 1024**3


def job(resources: str, step: str = ""):
    return parse_spec(f"name: t\nresources: {{{resources}}}\nsteps:\n"
                      f"  - {{name: a, run: x{step}}}\n").to_job()


def refused(resources: str, settings: Settings, step: str = "") -> list[str]:
    with pytest.raises(SpecError) as e:
        ceilings.check(job(resources, step), settings, source="job.yaml")
    assert e.value.exit_code == 2
    assert e.value.message == "job.yaml: invalid job spec"
    return e.value.problems


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


def test_memory_and_pids_above_the_defaults_are_refused_naming_each_ceiling(settings) -> None:
    found = refused("memory: 1Ti, pids: 32768", settings)
    assert found == [
        "resources.memory: 1Ti is above this runner's ceiling of 16Gi (max_memory_bytes, "
        "STOCKADE_MAX_MEMORY); ask for less or have the operator raise it",
        "resources.pids: 32768 is above this runner's ceiling of 4096 (max_pids, "
        "STOCKADE_MAX_PIDS); ask for less or have the operator raise it",
    ]


def test_a_raised_ceiling_allows_up_to_it_and_no_further(tmp_path: Path) -> None:
    settings = load_settings({"STOCKADE_HOME": str(tmp_path), "STOCKADE_MAX_MEMORY": "64Gi"})
    assert settings.max_memory_bytes == 64 * GiB
    ceilings.check(job("memory: 64Gi"), settings)
    found = refused("memory: 65Gi", settings)
    assert found[0].startswith("resources.memory: 65Gi is above this runner's ceiling of 64Gi")


def test_limits_at_or_below_the_ceilings_pass(settings) -> None:
    ceilings.check(job("cpus: 8, memory: 16Gi, pids: 4096, tmp: 8Gi, workspace: 8Gi, "
                       "timeout: 24h", step=", timeout: 24h"), settings)
    ceilings.check(job("cpus: 0.5, memory: 64Mi"), settings)


@pytest.mark.parametrize("resources, step, path, setting", [
    ("cpus: 9", "", "resources.cpus: 9 is above this runner's ceiling of 8", "max_cpus"),
    ("tmp: 9Gi", "", "resources.tmp: 9Gi is above this runner's ceiling of 8Gi", "max_tmp_bytes"),
    ("workspace: 10Gi", "", "resources.workspace: 10Gi is above", "max_workspace_bytes"),
    ("timeout: 25h", "", "resources.timeout: 25h is above this runner's ceiling of 24h",
     "max_timeout_s"),
    ("timeout: 1h", ", timeout: 30h", "steps[0].timeout: 30h is above", "max_timeout_s"),
])
def test_every_resource_and_step_timeout_has_a_ceiling(settings, resources: str, step: str,
                                                       path: str, setting: str) -> None:
    (problem,) = refused(resources, settings, step)
    assert problem.startswith(path) and f"({setting}, STOCKADE_MAX_" in problem


def test_a_lowered_ceiling_also_bounds_the_defaults(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_memory_bytes=GiB)
    (problem,) = refused("cpus: 1", settings)  # default memory: 2Gi
    assert problem.startswith("resources.memory: 2Gi is above this runner's ceiling of 1Gi")
    ceilings.check(job("memory: 1Gi"), settings)


def test_pids_stay_below_half_of_the_hosts_pid_max(settings, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pid_max = tmp_path / "pid_max"
    pid_max.write_text("1000\n")
    monkeypatch.setattr(ceilings, "PID_MAX_FILE", pid_max)
    (problem,) = refused("pids: 600", settings)
    assert problem.startswith("resources.pids: 600 is above this runner's ceiling of 500 "
                              "(half of this host's kernel.pid_max 1000)")
    ceilings.check(job("pids: 500"), settings)


def test_the_real_hosts_pid_max_is_read() -> None:
    host = ceilings.host_pid_max()
    assert host is not None and host >= 301
