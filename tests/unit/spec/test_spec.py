"""The job spec: strict parsing, defaults, and messages that name the path and the fix."""

from __future__ import annotations

import pytest

from stockade.errors import SpecError
from stockade.spec import Job, load_spec
from stockade.spec.model import DEFAULT_RESOURCES
from stockade.spec.parse import parse_spec
from stockade.spec.units import format_duration, parse_duration, parse_size

MINIMAL = "name: t\nsteps:\n  - name: a\n    run: echo hi\n"


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    assert e.value.exit_code == 2
    return e.value.problems


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.image == "host"
    assert spec.egress.mode.value == "none"
    assert spec.resources == DEFAULT_RESOURCES
    assert (spec.resources.cpus, spec.resources.memory, spec.resources.pids) == (1.0, 2 << 30, 1024)
    assert (spec.resources.tmp, spec.resources.workspace) == (512 << 20, 1 << 30)
    assert spec.to_job().timeout == 1800


def test_bad_duration_names_path_and_fix() -> None:
    found = problems(MINIMAL + "    timeout: 5 minutes\n")
    assert found == ["steps[0].timeout: '5 minutes' is not a duration; use e.g. 90s, 5m, 1h "
                     "or 1h30m"]


@pytest.mark.parametrize("text, key", [
    ("name: t\nsteps: []\n", "steps: at least one step"),
    ("name: t\n", "steps: required key is missing"),
    (MINIMAL + "bogus: 1\n", "bogus: unknown key"),
    (MINIMAL + "    shell: zsh\n", "steps[0].shell: unknown key"),
    (MINIMAL + "resources: {memory: lots}\n", "resources.memory: 'lots' is not a size"),
    (MINIMAL + "resources: {timeout: 100h}\n", "longer than the 72h a job may run"),
    (MINIMAL + "resources: {pids: '5'}\n", "resources.pids: should be a whole number"),
    (MINIMAL + "resources: {cpus: two}\n", "resources.cpus: 'two' is not a number of CPUs"),
    (MINIMAL + "env: {A: 1}\n", "env.A: should be text, got a number 1; quote it"),
    (MINIMAL + "env: {PATH: /x}\n", "env: 'PATH' is set by stockade"),
    (MINIMAL + "env: {STOCKADE_X: y}\n", "env: 'STOCKADE_X' is set by stockade"),
    (MINIMAL + "artifacts: ['../x']\n", "artifacts: '../x' must be a glob relative"),
    (MINIMAL + "artifacts: ['/etc/*']\n", "artifacts: '/etc/*' must be a glob relative"),
    (MINIMAL + "egress: {mode: open}\n", "egress.mode: 'open' is not an egress mode"),
    (MINIMAL + "image: alpine\n", "image: image 'alpine' is not an image reference: name the "
                                   "registry"),
    (MINIMAL + "  - name: a\n    run: echo again\n", "steps: two steps are named 'a'"),
    ("name: t\nsteps:\n  - name: a\n    run: '  '\n", "steps[0].run: the script is empty"),
    ("name: bad name\nsteps:\n  - {name: a, run: x}\n", "name: 'bad name' is not a valid name"),
    ("- just\n- a list\n", "the spec must be a mapping"),
    ("name: t\nname: u\nsteps: []\n", "duplicate key 'name'"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_invalid_specs_are_refused_with_a_path(text: str, key: str) -> None:
    assert any(key in p for p in problems(text)), problems(text)


def test_several_problems_are_all_reported() -> None:
    found = problems("name: t\nsteps:\n  - {name: a, run: x, timeout: soon}\nfoo: 1\n")
    assert len(found) == 2


def test_job_round_trips_through_json() -> None:
    job = parse_spec(MINIMAL + "    timeout: 1h30m\nresources: {timeout: 90s, memory: 1G}\n"
                     "artifacts: [dist/**]\nenv: {A: b}\n").to_job()
    again = Job.from_json(job.to_json())
    assert again == job
    assert again.steps[0].timeout == 5400 and again.timeout == 90
    assert again.resources.memory == 10**9


def test_validated_specs_are_cached_by_content(tmp_path) -> None:
    path, cache = tmp_path / "job.yaml", tmp_path / "cache"
    path.write_text(MINIMAL)
    first = load_spec(path, cache)
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1
    assert load_spec(path, cache) == first
    path.write_text(MINIMAL + "bogus: 1\n")  # a changed file misses the cache
    with pytest.raises(SpecError):
        load_spec(path, cache)
    entries[0].write_text("{not json")  # a damaged entry is revalidated, not trusted
    path.write_text(MINIMAL)
    assert load_spec(path, cache) == first


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5), ("2m5s", 125),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 minutes", "m", "1d", "-1s", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text, size", [
    ("512Mi", 512 << 20), ("2Gi", 2 << 30), ("100M", 100_000_000), ("1G", 10**9),
    ("4096", 4096), (4096, 4096), ("1.5Gi", 3 << 29), ("64Ki", 65536),
])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "1 GB", "Gi", "-5Mi", "1Pi"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
