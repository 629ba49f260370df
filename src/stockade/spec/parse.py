"""Validating a job spec from YAML with pydantic: errors with paths, bounded and escaped."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import ValidationError

from stockade.spec.model import JobSpec
from stockade.spec.problems import excerpt, spec_error
from stockade.spec.yamldoc import RefusedYaml, load_document

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_spec(data: bytes | str, *, source: str = "<spec>") -> JobSpec:
    """Validate a job spec given as YAML text."""
    try:
        doc = load_document(data)
    except RefusedYaml as e:
        raise spec_error(source, [_yaml_problem(e)]) from e
    except yaml.YAMLError as e:
        raise spec_error(source, [f"not valid YAML: {_yaml_problem(e)}"]) from e
    if not isinstance(doc, dict):
        raise spec_error(
            source, ["the spec must be a mapping with at least 'name' and 'steps', e.g.\n"
                     "    name: build\n    steps:\n      - name: test\n        run: make test"]
        )
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors(include_url=False)]
        raise spec_error(source, [p for p in problems if p]) from e


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{problem[:200]}{where}"


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif not isinstance(part, str):
            out += f"[{excerpt(part, 30)}]"  # a key YAML made a number, a bool or null
        elif part.startswith(("function-", "lax-")) or part in ("str", "int"):
            continue
        elif part == "[key]":
            out += " (the key)"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{excerpt(part, 30)}]"  # a key the spec chose: shown escaped and short
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
        msg = f"{msg[0].lower()}{msg[1:]}, got {type(got).__name__} {excerpt(got)}"
        if kind == "string_type" and isinstance(got, (int, float)):
            text = str(got).lower() if isinstance(got, bool) else excerpt(got)
            msg += f'; quote it: "{text}"'
    else:
        msg = f"{msg[0].lower()}{msg[1:]}"
    return f"{loc}: {msg}"
