"""Shared fixtures: a private STOCKADE_HOME and a helper that runs the real CLI."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from tests.support.postgres import database_url, postgres_server, store_url  # noqa: F401
from tests.support.registry import plain_registry, registry, token_registry  # noqa: F401

# shared, noisy machines: no per-example deadline (a slow example is not a wrong one)
hypothesis_settings.register_profile("stockade", deadline=None)
hypothesis_settings.load_profile("stockade")

STOCKADE = str(Path(sys.executable).parent / "stockade")


@dataclass
class JobRun:
    """The outcome of one ``stockade run --json`` as a user sees it."""

    rc: int
    result: dict[str, Any]
    stdout: str
    stderr: str
    home: Path

    @property
    def log(self) -> str:
        """The stored log of the job."""
        path = self.home / "logs" / f"{self.result['job_id']}.log"
        return path.read_text(errors="replace")

    def output(self, step: str) -> str:
        """What ``step`` printed (from the stored log, timestamps removed)."""
        text = self.log.split(f"==> step {step}\n", 1)[1]
        lines = []
        for line in text.splitlines():
            if line[9:].startswith(f"==> step {step} "):
                break
            lines.append(line[9:].removeprefix("| "))
        return "\n".join(lines)

    @property
    def step_status(self) -> list[str]:
        """The status of each step that ran."""
        return [s["status"] for s in self.result["steps"]]


@pytest.fixture(scope="session", autouse=True)
def _tidy_runtime_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each state directory a test makes is an installation with a runtime directory of its
    own (its marker and /etc copy, ~1 MB, often on a tmpfs): removed when the session ends,
    unless a job directory is still in it."""
    yield
    for marker in tmp_path_factory.getbasetemp().rglob("installation-id"):
        installation = marker.read_text().strip()
        if not (len(installation) == 10 and installation.isascii() and installation.isalnum()):
            continue
        runtime = Path("/run/stockade") / installation
        if runtime.is_dir() and all(p.name.startswith((".", "etc-"))
                                    for p in runtime.iterdir()):
            shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(scope="session")
def stockade_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state directory for the session (the database is migrated once)."""
    return tmp_path_factory.mktemp("stockade-home") / "home"


def job_dir(home: Path, job_id: str) -> Path:
    """The host directory of a job's sandbox: <runtime dir>/<installation id>/<job>."""
    return Path("/run/stockade") / (home / "installation-id").read_text().strip() / job_id


def job_cgroups(home: Path, job_id: str, parent: str = "stockade") -> list[str]:
    """The job's cgroup directories that exist (v1 hierarchies or v2), of any hierarchy."""
    name = f"{(home / 'installation-id').read_text().strip()}-{job_id}"
    return glob.glob(f"/sys/fs/cgroup/*/{parent}/{name}") + glob.glob(
        f"/sys/fs/cgroup/{parent}/{name}")


# settings every CLI run of the current test gets (the containment corpus sets the sandbox
# backend here: each probe runs on every backend)
CLI_SETTINGS: dict[str, str] = {}


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment a user would run the CLI with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["STOCKADE_HOME"] = str(home)
    env.update(CLI_SETTINGS)
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 300, **env: str
            ) -> subprocess.CompletedProcess[str]:
    """Run ``stockade ARGS`` as a subprocess."""
    return subprocess.run([STOCKADE, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(home, **env), stdin=subprocess.DEVNULL)


@pytest.fixture
def run_job(stockade_home: Path, tmp_path: Path) -> Iterator[Any]:
    """``run_job(spec_yaml, workspace=None, **env)`` → :class:`JobRun`."""

    def run(spec: str, workspace: Path | None = None, timeout: float = 300,
            **env: str) -> JobRun:
        spec_path = tmp_path / "job.yaml"
        spec_path.write_text(spec)
        ws = workspace or tmp_path / "ws"
        ws.mkdir(exist_ok=True)
        proc = run_cli(stockade_home, "run", str(spec_path), "--workspace", str(ws), "--json",
                       timeout=timeout, **env)
        lines = proc.stdout.splitlines()
        result = json.loads(lines[-1]) if lines else {}
        return JobRun(proc.returncode, result, proc.stdout, proc.stderr, stockade_home)

    yield run


# fixtures that use the helpers above
from tests.support.debian import python_image  # noqa: E402,F401
