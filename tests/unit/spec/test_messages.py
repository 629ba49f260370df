"""Issue 8 item 11: spec errors in a spec author's words, with "did you mean"."""

from __future__ import annotations

import pytest

from stockade.errors import SpecError
from stockade.spec.parse import parse_spec

STEPS = "steps:\n  - {name: a, run: 'true'}\n"


def problems(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    return e.value.diagnostics()


@pytest.mark.parametrize(("text", "expected"), [
    ("name: a\nstep: [{name: s, run: x}]\n", "step: unknown key; did you mean 'steps'?"),
    ("name: a\nsteps: [{name: s, run: x, timout: 5}]\n",
     "steps[0].timout: unknown key; did you mean 'timeout'?"),
    (f"name: a\n{STEPS}resource: {{memory: 1Gi}}\n", "resource: unknown key; did you mean "
     "'resources'?"),
    (f"name: a\n{STEPS}egress: {{mode: block, alow: [x]}}\n",
     "egress.alow: unknown key; did you mean 'allow'?"),
    (f"name: a\n{STEPS}zebra: 1\n", "zebra: unknown key; remove it or check its spelling "
     "(keys here: name, image, steps"),
])
def test_unknown_keys_suggest_the_closest_known_one(text: str, expected: str) -> None:
    assert expected in problems(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("name: a\nsteps: [5]\n", "steps[0]: should be a mapping (key: value lines or {key: "
     "value}), got a number 5"),
    ("name: a\nsteps: {name: s}\n", "steps: should be a list"),
    ("name: a\nsteps: [{name: s, run: [a]}]\n", "steps[0].run: should be text, got a list"),
    (f"name: a\n{STEPS}env: {{DEBUG: true}}\n", 'env.DEBUG: should be text, got a boolean '
     'True; quote it: "true"'),
])
def test_type_errors_use_the_spec_authors_words(text: str, expected: str) -> None:
    text_out = problems(text)
    assert expected in text_out
    assert "instance of" not in text_out and "Input should" not in text_out


def test_every_reserved_variable_is_named() -> None:
    out = problems(f"name: a\n{STEPS}env: {{HOME: x, PATH: y, STOCKADE_X: z}}\n")
    assert "'HOME', 'PATH', 'STOCKADE_X' are set by stockade" in out
