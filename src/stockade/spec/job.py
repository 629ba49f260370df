"""The validated job as the rest of stockade sees it: frozen records, no pydantic.

:mod:`stockade.spec.model` (pydantic) validates untrusted YAML once; it is converted into a
:class:`Job`, which the control plane stores as JSON and the runner reads back without
re-validating (the database and the spec cache are stockade's own, trusted data).
"""

import json
from collections.abc import Mapping
from typing import Any, NamedTuple


class JobStep(NamedTuple):
    """One step: a shell script and an optional timeout in seconds."""

    name: str
    run: str
    timeout: float | None = None


class JobResources(NamedTuple):
    """Limits of the whole job (bytes, seconds, CPUs)."""

    cpus: float
    memory: int
    pids: int
    tmp: int
    workspace: int
    timeout: float


class JobSecret(NamedTuple):
    """A secret the job asks for, delivered as an environment variable or a file."""

    name: str
    delivery: str = "env"


class IdToken(NamedTuple):
    """The job's OIDC identity token: its audience."""

    aud: str


class JobEgress(NamedTuple):
    """The network policy."""

    mode: str = "none"
    allow: tuple[str, ...] = ()
    on_violation: str = "log"


class Job(NamedTuple):
    """A validated job spec with every default applied."""

    name: str
    image: str
    steps: tuple[JobStep, ...]
    resources: JobResources
    env: Mapping[str, str] = {}
    secrets: tuple[JobSecret, ...] = ()
    egress: JobEgress = JobEgress()
    artifacts: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    id_token: IdToken | None = None
    isolation: str = "standard"  # strong: only runners whose backend is runsc (gVisor)

    @property
    def timeout(self) -> float:
        """The wall-clock limit of the whole job, in seconds."""
        return self.resources.timeout

    def to_json(self) -> str:
        """Stable JSON for the database and the spec cache."""
        return json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        """The inverse of :meth:`to_json` (for stockade's own data only)."""
        d: dict[str, Any] = json.loads(text)
        return cls(
            name=d["name"], image=d["image"],
            steps=tuple(JobStep(**s) for s in d["steps"]),
            resources=JobResources(**d["resources"]),
            env=dict(d["env"]), secrets=tuple(JobSecret(**s) for s in d["secrets"]),
            egress=JobEgress(d["egress"]["mode"], tuple(d["egress"]["allow"]),
                             d["egress"]["on_violation"]),
            artifacts=tuple(d["artifacts"]), labels=tuple(d["labels"]),
            id_token=IdToken(**d["id_token"]) if d.get("id_token") else None,
            isolation=d.get("isolation", "standard"),
        )


def _plain(value: Any) -> Any:
    """Records as JSON objects (nested ones too), tuples as arrays."""
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
