"""Validating a job spec from YAML with pydantic: duplicate keys refused, errors with paths."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from stockade.errors import SpecError
from stockade.spec.model import JobSpec

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Loader):  # type: ignore[misc,valid-type]
    """A safe loader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping
)


def parse_spec(data: bytes | str, *, source: str = "<spec>") -> JobSpec:
    """Validate a job spec given as YAML text."""
    try:
        doc = yaml.load(data, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise SpecError(source, [f"not valid YAML: {_yaml_problem(e)}"]) from e
    if not isinstance(doc, dict):
        raise SpecError(
            source, ["the spec must be a mapping with at least 'name' and 'steps', e.g.\n"
                     "    name: build\n    steps:\n      - name: test\n        run: make test"]
        )
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        raise SpecError(source, [p for p in problems if p]) from e


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{problem}{where}"


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part.startswith("lax-") or part in ("str", "int"):
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _problem(err: Any) -> str | None:
    loc = _path(tuple(err["loc"]))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; remove it or check its spelling (see the job spec in README)"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind == "too_short" and loc == "steps":
        if err.get("input"):
            return None  # pydantic's echo of the item errors already reported
        return "steps: at least one step is needed, e.g. - {name: test, run: make test}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif kind.endswith("_type"):
        got = err.get("input")
        msg = f"{msg[0].lower()}{msg[1:]}, got {type(got).__name__} {got!r}"
        if kind == "string_type" and isinstance(got, (int, float, bool)):
            msg += f"; quote it: '{got}'"
    else:
        msg = f"{msg[0].lower()}{msg[1:]}"
    return f"{loc}: {msg}"
