"""Pydantic models of job spec v1, strict: unknown keys and wrong types are errors."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from stockade.egress.policy import parse_rule
from stockade.spec.job import IdToken, Job, JobEgress, JobResources, JobSecret, JobStep
from stockade.spec.problems import excerpt
from stockade.spec.units import format_duration, format_spec_size, parse_duration, parse_size

# fullmatch everywhere: with re.match, '$' also matches before a final newline ("build\n")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=/+-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_PRINTABLE_ASCII = re.compile(r"[!-~]+")  # no space, no control character
RESERVED_ENV = ("CI", "HOME", "PATH", "HOSTNAME", "USER", "LOGNAME", "BASH_ENV")

MAX_TIMEOUT_S = 72 * 3600
MiB, TiB = 1024**2, 1024**4
MAX_PIDS = 4_194_304  # the kernel's PID_MAX_LIMIT; the runner also keeps below kernel.pid_max
MAX_ENV_VARS = 256
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_TOTAL = 256 * 1024
MAX_LIST = 100  # secrets, artifacts, labels
MAX_ALLOW = 256
MAX_PATTERN = 256


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"{excerpt(value)} is not a duration; "
                         "write it as a string such as 90s or 5m")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    if seconds > MAX_TIMEOUT_S:
        raise ValueError(f"{excerpt(value)} is longer than the 72h a job may run")
    return seconds


def _size_between(low: int, high: int) -> Any:
    """A size validator: ``low`` and ``high`` are what no runner could sensibly give."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"{excerpt(value)} is not a size; use e.g. 512Mi or 2Gi")
        size = parse_size(value)
        if size < low:
            raise ValueError(f"{excerpt(value)} is too small; at least "
                             f"{format_spec_size(low)} is needed")
        if size > high:
            raise ValueError(f"{excerpt(value)} is too large; at most "
                             f"{format_spec_size(high)} is possible")
        return size

    return BeforeValidator(check)


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{excerpt(value)} is not a valid name; use 1-100 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return value


def _too_many(what: str, items: tuple[Any, ...] | dict[Any, Any], limit: int) -> None:
    if len(items) > limit:
        raise ValueError(f"{len(items)} {what} are more than the {limit} a job may have")


Duration = Annotated[float, BeforeValidator(_duration), PlainSerializer(format_duration)]
Memory = Annotated[int, _size_between(16 * MiB, 4 * TiB)]
DiskSize = Annotated[int, _size_between(1 * MiB, 4 * TiB)]
Name = Annotated[StrictStr, AfterValidator(_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Strict):
    """One step: a shell script run in the job's sandbox."""

    name: Name
    run: StrictStr = Field(min_length=1)
    timeout: Duration | None = None

    @field_validator("run")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the script is empty; write the commands this step runs")
        return v


class Resources(_Strict):
    """Limits enforced on the whole job (all steps and their processes)."""

    cpus: float = Field(default=1.0, ge=0.01, le=256, allow_inf_nan=False)
    memory: Memory = 2 * 1024**3
    pids: StrictInt = Field(default=1024, ge=16, le=MAX_PIDS)
    tmp: DiskSize = 512 * MiB
    workspace: DiskSize = 1024**3
    timeout: Duration = 1800.0

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{excerpt(v)} is not a number of CPUs; use e.g. 1, 2 or 0.5")
        return float(v)


DEFAULT_RESOURCES = Resources()


class EgressMode(StrEnum):
    """How the job may reach the network."""

    NONE = "none"
    BLOCK = "block"
    AUDIT = "audit"


class Isolation(StrEnum):
    """How far the job is kept from the host's kernel: ``standard`` (namespaces, seccomp,
    cgroups: every backend) or ``strong`` (also a kernel of its own: runners whose sandbox
    backend is runsc, gVisor)."""

    STANDARD = "standard"
    STRONG = "strong"


class EgressSpec(_Strict):
    """The job's network policy (``none``: no network at all)."""

    mode: EgressMode = EgressMode.NONE
    allow: tuple[StrictStr, ...] = ()
    on_violation: StrictStr = "log"

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> EgressMode:
        try:
            return EgressMode(v)
        except ValueError:
            raise ValueError(f"{excerpt(v)} is not an egress mode; use none, block or audit"
                             ) from None

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        _too_many("allow entries", v, MAX_ALLOW)
        for entry in v:
            if len(entry) > MAX_PATTERN or not _PRINTABLE_ASCII.fullmatch(entry):
                raise ValueError(f"{excerpt(entry)} is not a destination; use HOST:PORT or "
                                 f"CIDR:PORT in at most {MAX_PATTERN} printable characters")
            parse_rule(entry)  # ValueError with the entry and a hint
        return v

    @field_validator("on_violation")
    @classmethod
    def _on_violation(cls, v: str) -> str:
        if v not in ("log", "kill"):
            raise ValueError(f"{excerpt(v)} is not a violation response; "
                             "use log (default) or kill")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EgressSpec:
        if self.mode is EgressMode.NONE and self.allow:
            raise ValueError("allow entries need mode: block or mode: audit "
                             "(mode none means no network at all)")
        return self


class SecretRef(_Strict):
    """``{name: NAME, as: file}``: a secret delivered as ``/run/secrets/NAME``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: StrictStr
    as_: StrictStr = Field(default="env", alias="as")

    @field_validator("as_")
    @classmethod
    def _delivery(cls, v: str) -> str:
        if v not in ("env", "file"):
            raise ValueError(f"{excerpt(v)} is not a delivery; use env (default) or file")
        return v


class IdTokenSpec(_Strict):
    """``id_token: {aud: ...}``: give the job a signed OIDC token for that audience."""

    aud: StrictStr = Field(min_length=1, max_length=200)

    @field_validator("aud")
    @classmethod
    def _aud(cls, v: str) -> str:
        if not _PRINTABLE_ASCII.fullmatch(v):
            raise ValueError(f"{excerpt(v)} is not an audience; use printable characters "
                             "without spaces, e.g. https://deploy.example.com")
        return v


class JobSpec(_Strict):
    """A whole job: what to run, with which limits, and what to keep."""

    name: Name
    image: StrictStr = "host"
    steps: tuple[Step, ...] = Field(min_length=1, max_length=200)
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    secrets: tuple[StrictStr | SecretRef, ...] = ()
    id_token: IdTokenSpec | None = None
    egress: EgressSpec = EgressSpec()
    resources: Resources = DEFAULT_RESOURCES
    artifacts: tuple[StrictStr, ...] = ()
    labels: tuple[StrictStr, ...] = ()
    isolation: Isolation = Isolation.STANDARD

    @field_validator("isolation", mode="before")
    @classmethod
    def _isolation(cls, v: Any) -> Any:
        if v not in tuple(Isolation):
            raise ValueError(f"{excerpt(v)} is not an isolation; use standard (the default) "
                             "or strong (runners with the runsc backend only)")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if v != "host":
            from stockade.image.reference import BadReference, parse_reference

            try:
                parse_reference(v)
            except BadReference as e:
                raise ValueError(f"image {excerpt(v)} is not an image reference: {e.why}; write "
                                 "host (the host's /usr, read-only) or "
                                 "REGISTRY/REPO@sha256:DIGEST or REGISTRY/REPO:TAG") from None
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        _too_many("variables", v, MAX_ENV_VARS)
        reserved = [k for k in v if k in RESERVED_ENV or k.startswith("STOCKADE_")]
        for key, value in v.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"{excerpt(key)} is not a valid variable name; "
                                 "use [A-Za-z_][A-Za-z0-9_]*, at most 128 characters")
            if "\0" in value:
                raise ValueError(f"the value of {key} contains a NUL byte")
            if len(value) > MAX_ENV_VALUE:
                raise ValueError(f"the value of {key} is {len(value)} characters, more than "
                                 f"the {MAX_ENV_VALUE} a variable may have; put it in a file")
        if reserved:
            names = ", ".join(excerpt(k) for k in reserved)
            raise ValueError(f"{names} {'is' if len(reserved) == 1 else 'are'} set by stockade "
                             "and cannot be overridden")
        total = sum(len(k) + len(val) + 2 for k, val in v.items())
        if total > MAX_ENV_TOTAL:
            raise ValueError(f"the variables take {total} characters, more than the "
                             f"{MAX_ENV_TOTAL} a job may have; put large values in files")
        return v

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        _too_many("artifact patterns", v, MAX_LIST)
        for pattern in v:
            parts = pattern.split("/")
            if len(pattern) > MAX_PATTERN or not pattern.isprintable():
                raise ValueError(f"{excerpt(pattern)} must be at most {MAX_PATTERN} printable "
                                 "characters")
            if not pattern or pattern.startswith("/") or ".." in parts:
                raise ValueError(
                    f"{excerpt(pattern)} must be a glob relative to the workspace without '..', "
                    "e.g. dist/** or reports/*.xml"
                )
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: tuple[str | SecretRef, ...]) -> tuple[SecretRef, ...]:
        _too_many("secrets", v, MAX_LIST)
        refs = tuple(SecretRef(name=s) if isinstance(s, str) else s for s in v)
        seen: set[str] = set()
        for ref in refs:
            if not _ENV_NAME.fullmatch(ref.name):
                raise ValueError(f"{excerpt(ref.name)} is not a valid secret name; "
                                 "use [A-Za-z_][A-Za-z0-9_]*, at most 128 characters")
            if ref.name in seen:
                raise ValueError(f"{ref.name!r} is requested twice")
            if ref.name in RESERVED_ENV or ref.name.startswith("STOCKADE_"):
                raise ValueError(f"{ref.name!r} is set by stockade; name the secret otherwise")
            seen.add(ref.name)
        return refs

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        _too_many("labels", v, MAX_LIST)
        for label in v:
            if not _LABEL.fullmatch(label):
                raise ValueError(f"{excerpt(label)} is not a valid label; use 1-100 letters, "
                                 "digits or '._:=/+-', starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _secret_env_clash(self) -> JobSpec:
        for ref in self.secrets:
            if isinstance(ref, SecretRef) and ref.as_ == "env" and ref.name in self.env:
                raise ValueError(f"{ref.name} is both in env and a secret delivered as env; "
                                 "rename one of them")
        return self

    @field_validator("steps")
    @classmethod
    def _unique_steps(cls, v: tuple[Step, ...]) -> tuple[Step, ...]:
        seen: set[str] = set()
        for step in v:
            if step.name in seen:
                raise ValueError(f"two steps are named {step.name!r}; give each step its own name")
            seen.add(step.name)
        return v

    def to_job(self) -> Job:
        """The validated spec as stockade's internal, pydantic-free value."""
        r = self.resources
        return Job(
            name=self.name, image=self.image,
            steps=tuple(JobStep(s.name, s.run, s.timeout) for s in self.steps),
            resources=JobResources(r.cpus, r.memory, r.pids, r.tmp, r.workspace, r.timeout),
            env=dict(self.env),
            secrets=tuple(JobSecret(s.name, s.as_) if isinstance(s, SecretRef)
                          else JobSecret(s) for s in self.secrets),
            egress=JobEgress(self.egress.mode.value, self.egress.allow,
                             self.egress.on_violation),
            artifacts=self.artifacts, labels=self.labels,
            id_token=IdToken(self.id_token.aud) if self.id_token else None,
            isolation=self.isolation.value,
        )
