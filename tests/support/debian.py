"""Images built with ``stockade image build`` from the local Debian package mirror that
``make test`` fetches once (``.cache/debs``: served from disk by mmdebstrap's copy://, so a
build never touches the network), pushed to a registry on loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import run_cli
from tests.support.registry import RunningRegistry

DEBS = Path(__file__).resolve().parents[2] / ".cache" / "debs"
SUITE = "bookworm"


def mirror() -> str:
    """The sources line of the local mirror (fails with the fix if it was not fetched)."""
    if not (DEBS / "Release").exists():
        pytest.fail(f"the local Debian mirror {DEBS} is missing: run make debs (make test does)")
    return f"deb [trusted=yes] copy://{DEBS} ./"


def build(home: Path, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``stockade image build NAME --suite bookworm --mirror <local> OPTIONS``."""
    return run_cli(home, "image", "build", name, "--suite", SUITE, "--mirror", mirror(),
                   *options, timeout=900)


class Built(NamedTuple):
    """A built image pushed to a registry: the reference a job names it by, and the env."""

    reference: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def python_image(plain_registry: RunningRegistry,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Debian's Essential packages + python3 + ca-certificates, built once per session and
    pushed to the plain registry."""
    home = tmp_path_factory.mktemp("image-build") / "home"
    built = build(home, "test/python", "--include", "python3,ca-certificates")
    assert built.returncode == 0, built.stderr
    image = built.stdout.splitlines()[-1]
    host = plain_registry.host
    env = {"STOCKADE_IMAGE_REGISTRIES": host, "STOCKADE_INSECURE_REGISTRIES": host}
    pushed = run_cli(home, "image", "push", image, f"{host}/test/python:1", **env)
    assert pushed.returncode == 0, pushed.stderr
    yield Built(pushed.stdout.splitlines()[-1], env)
