"""The validated job as the rest of stockade sees it: frozen dataclasses, no pydantic.

:mod:`stockade.spec.model` (pydantic) validates untrusted YAML once; it is converted into a
:class:`Job`, which the control plane stores as JSON and the runner reads back without
re-validating (the database and the spec cache are stockade's own, trusted data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobStep:
    """One step: a shell script and an optional timeout in seconds."""

    name: str
    run: str
    timeout: float | None = None


@dataclass(frozen=True)
class JobResources:
    """Limits of the whole job (bytes, seconds, CPUs)."""

    cpus: float
    memory: int
    pids: int
    tmp: int
    workspace: int
    timeout: float


@dataclass(frozen=True)
class JobSecret:
    """A secret the job asks for, delivered as an environment variable or a file."""

    name: str
    delivery: str = "env"


@dataclass(frozen=True)
class IdToken:
    """The job's OIDC identity token: its audience."""

    aud: str


@dataclass(frozen=True)
class JobEgress:
    """The network policy."""

    mode: str = "none"
    allow: tuple[str, ...] = ()
    on_violation: str = "log"


@dataclass(frozen=True)
class Job:
    """A validated job spec with every default applied."""

    name: str
    image: str
    steps: tuple[JobStep, ...]
    resources: JobResources
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[JobSecret, ...] = ()
    egress: JobEgress = JobEgress()
    artifacts: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    id_token: IdToken | None = None

    @property
    def timeout(self) -> float:
        """The wall-clock limit of the whole job, in seconds."""
        return self.resources.timeout

    def to_json(self) -> str:
        """Stable JSON for the database and the spec cache."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Job:
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
        )
