"""Spec texts shared by the unit and integration tests of hostile spec input."""

from __future__ import annotations

STEPS = "steps:\n  - {name: a, run: 'true'}\n"
VALID = "name: t\n" + STEPS


def alias_bomb(levels: int) -> str:
    """The "billion laughs": each level refers nine times to the one below."""
    lines = ["  a: &a [" + ",".join(['"lol"'] * 9) + "]"]
    for i in range(1, levels):
        lines.append(f"  {chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9)
                     + "]")
    return f"{VALID}x:\n" + "\n".join(lines) + f"\nenv: {{A: *{chr(96 + levels)}}}\n"
