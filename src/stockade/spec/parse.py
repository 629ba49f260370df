"""Validating a job spec from YAML with pydantic: errors with paths, bounded and escaped."""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import ValidationError

from stockade.spec.model import EgressSpec, IdTokenSpec, JobSpec, Resources, SecretRef, Step
from stockade.spec.problems import MAX_PROBLEMS, excerpt, spec_error
from stockade.spec.yamldoc import RefusedYaml, TooManyNodes, load_document

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# the mapping a key belongs to, by its path without list indexes: for "did you mean"
_MODELS: dict[tuple[str, ...], Any] = {
    (): JobSpec, ("steps",): Step, ("resources",): Resources, ("egress",): EgressSpec,
    ("secrets",): SecretRef, ("id_token",): IdTokenSpec,
}
# pydantic's wording for a value of the wrong type, as a spec author would say it
_SHOULD_BE = {
    "dict_type": "should be a mapping (key: value lines or {key: value})",
    "model_type": "should be a mapping (key: value lines or {key: value})",
    "model_attributes_type": "should be a mapping (key: value lines or {key: value})",
    "list_type": "should be a list (- item lines or [a, b])",
    "tuple_type": "should be a list (- item lines or [a, b])",
    "string_type": "should be text",
    "int_type": "should be a whole number",
    "float_type": "should be a number",
    "bool_type": "should be true or false",
}


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
        raise spec_error(source, *_problems(e)) from e


def _problems(e: ValidationError) -> tuple[list[str], int]:
    """The problems to show (each costs a search for the closest key: only those shown are
    written, however many thousands a spec has) and how many more there are."""
    errors = e.errors(include_url=False)
    problems: list[str] = []
    for i, err in enumerate(errors):
        if len(problems) == MAX_PROBLEMS:
            return problems, len(errors) - i
        problem = _problem(err)
        if problem:
            problems.append(problem)
    return problems, 0


def parse_small(data: str, nodes: int) -> JobSpec | None:
    """``data`` as a job spec if it is a valid one of at most ``nodes`` YAML values, else
    None (:func:`parse_spec` then says what is wrong): the work stays a few milliseconds
    whatever the text, so that a server may do it on its event loop."""
    try:
        doc = load_document(data, limit=nodes)
        return JobSpec.model_validate(doc) if isinstance(doc, dict) else None
    except (TooManyNodes, yaml.YAMLError, ValidationError):
        return None


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
        return f"{loc}: unknown key; {_suggest(tuple(err['loc']))}"
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
        wanted = _SHOULD_BE.get(kind, f"{msg[0].lower()}{msg[1:]}")
        msg = f"{wanted}, got {_kind(got)} {excerpt(got)}"
        if kind == "string_type" and isinstance(got, (int, float)):
            text = str(got).lower() if isinstance(got, bool) else excerpt(got)
            msg += f'; quote it: "{text}"'
    else:
        msg = f"{msg[0].lower()}{msg[1:]}"
    return f"{loc}: {msg}"


def _suggest(loc: tuple[Any, ...]) -> str:
    """"did you mean" for an unknown key, else where the keys are listed."""
    key = loc[-1] if loc else None
    parent = tuple(p for p in loc[:-1] if isinstance(p, str))
    model = _MODELS.get(parent)
    if isinstance(key, str) and model is not None:
        known = [f.alias or name for name, f in model.model_fields.items()]
        close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]!r}? (keys here: {', '.join(known)})"
        return f"remove it or check its spelling (keys here: {', '.join(known)})"
    return "remove it or check its spelling (see the job spec in README)"


def _kind(value: Any) -> str:
    """What YAML made of a value, in YAML's words."""
    names = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number",
             float: "a number", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)
