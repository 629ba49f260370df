"""What an untrusted job's egress may ask for: never more than the operator allows.

An ``untrusted`` job (a fork pull request, say) writes its own spec, so its ``egress`` block
is hostile. The operator lists the most such jobs may reach (``settings.egress_untrusted_allow``);
every ``egress.allow`` entry of an untrusted job must be covered by one of those entries, and
``mode: audit`` (which lets every destination out that is not always refused) is refused
outright. Admission refuses the job with the text :func:`untrusted_refusal` returns; the
runner narrows the policy the same way (:func:`covered`) as a second line.
"""

from __future__ import annotations

from stockade.egress.policy import Rule, parse_rule

SETTING = "settings egress_untrusted_allow"
_SHOWN = 120  # a job-chosen entry quoted in a refusal is cut to this many characters


def untrusted_refusal(mode: str, allow: tuple[str, ...], operator_allow: tuple[str, ...]
                      ) -> str | None:
    """Why an untrusted job's egress asks for more than the operator allows, or None.

    ``mode`` and ``allow`` are the spec's ``egress`` block; ``operator_allow`` is the
    operator's allowlist for untrusted work. The text quotes the offending entry (cut short,
    control characters escaped); the caller masks secrets before recording it."""
    if mode == "audit":
        return ("egress mode audit lets every destination out and is refused for untrusted "
                "jobs; use mode: block with entries the operator allows for untrusted work "
                f"({SETTING})")
    if mode != "block":
        return None
    try:
        ceiling = tuple(parse_rule(e, operator=True) for e in operator_allow)
    except ValueError as e:
        return f"the operator's {SETTING} is invalid: {e}"
    for entry in allow:
        try:
            rule = parse_rule(entry)
        except ValueError as e:
            return str(e)[:2 * _SHOWN]
        if not any(covered(rule, by) for by in ceiling):
            shown = repr(entry[:_SHOWN])
            if not ceiling:
                return (f"egress.allow {shown}: untrusted jobs may not reach any destination "
                        f"on this installation ({SETTING} is empty)")
            return (f"egress.allow {shown} is not covered by the destinations the operator "
                    f"allows for untrusted jobs ({SETTING})")
    return None


def covered(rule: Rule, by: Rule) -> bool:
    """Whether every destination ``rule`` admits is admitted by ``by``."""
    if rule.port != by.port:
        return False
    if rule.network is not None:
        return (by.network is not None and rule.network.version == by.network.version
                and rule.network.subnet_of(by.network))  # type: ignore[arg-type]
    if rule.host is not None:
        return by.matches_name(rule.host, rule.port)
    return by.suffix is not None and rule.suffix is not None and (
        rule.suffix == by.suffix or rule.suffix.endswith("." + by.suffix))


def untrusted_ceiling(mode: str, allow: tuple[str, ...], operator_allow: tuple[str, ...]
                      ) -> tuple[str, tuple[str, ...], list[str]]:
    """An untrusted job's egress narrowed to the operator's ceiling: the mode (audit becomes
    block), the entries that are covered, and a note for each thing taken away."""
    notes = []
    if mode == "audit":
        mode = "block"
        notes.append("egress: mode audit is not available to untrusted jobs; using block")
    try:
        ceiling = tuple(parse_rule(e, operator=True) for e in operator_allow)
    except ValueError:
        ceiling = ()
    kept = []
    for entry in allow:
        try:
            ok = any(covered(parse_rule(entry), by) for by in ceiling)
        except ValueError:
            ok = False
        if ok:
            kept.append(entry)
        else:
            notes.append(f"egress: {entry[:_SHOWN]!r} dropped: not allowed for untrusted jobs "
                         f"({SETTING})")
    return mode, tuple(kept), notes
