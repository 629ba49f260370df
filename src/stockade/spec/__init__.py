"""The job spec (v1): the contract users write.

``load_spec(path)`` parses YAML strictly into a frozen :class:`JobSpec` with defaults applied;
any problem raises :class:`stockade.errors.SpecError` naming the path and the fix.
"""

from stockade.spec.load import load_spec, parse_spec
from stockade.spec.model import (
    DEFAULT_RESOURCES,
    EgressMode,
    EgressSpec,
    JobSpec,
    Resources,
    Step,
)

__all__ = [
    "DEFAULT_RESOURCES",
    "EgressMode",
    "EgressSpec",
    "JobSpec",
    "Resources",
    "Step",
    "load_spec",
    "parse_spec",
]
