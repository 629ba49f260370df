"""What a first user reads (issue 8 item 11): job ids by prefix, `show` in words, `jobs --json`
with durations, `egress baseline` saying when there is nothing to build from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("cli-output")
    home, spec = root / "home", root / "job.yaml"
    spec.write_text("name: f\nsteps:\n  - name: a\n    run: |\n      echo one\n      false\n")
    for _ in range(2):
        assert run_cli(home, "run", str(spec), "--workspace", str(root)).returncode == 1
    jobs = json.loads(run_cli(home, "jobs", "--json").stdout)
    return home, [j["job_id"] for j in jobs]


def test_an_ambiguous_prefix_lists_the_jobs_it_could_be(two_jobs: tuple[Path, list[str]]
                                                        ) -> None:
    home, ids = two_jobs
    shown = run_cli(home, "show", "j")
    assert shown.returncode == 2
    assert "'j' is the start of several job ids" in shown.stderr
    assert all(i in shown.stderr for i in ids)
    missing = run_cli(home, "show", "jzzzz")
    assert missing.returncode == 2 and "no job matches 'jzzzz'" in missing.stderr


def test_show_speaks_in_words_not_python_values(two_jobs: tuple[Path, list[str]]) -> None:
    home, ids = two_jobs
    out = run_cli(home, "show", ids[0]).stdout
    assert "failed at line 2: false" in out
    assert "None" not in out and "True" not in out and "False" not in out
    assert "expires_at=17" not in out  # times are dates, not epoch seconds


def test_jobs_json_has_the_duration_the_table_shows(two_jobs: tuple[Path, list[str]]) -> None:
    home, _ = two_jobs
    jobs = json.loads(run_cli(home, "jobs", "--json").stdout)
    assert all(isinstance(j["duration_s"], float) for j in jobs), jobs


def test_a_baseline_from_jobs_without_egress_says_so(two_jobs: tuple[Path, list[str]]) -> None:
    home, ids = two_jobs
    base = run_cli(home, "egress", "baseline", ids[0])
    assert base.returncode == 0
    assert f"job {ids[0]} recorded no egress; run it with egress: {{mode: audit}}" \
        in base.stderr
