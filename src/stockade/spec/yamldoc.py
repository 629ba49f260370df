"""Reading a spec's YAML: only the subset a job spec needs, bounded in depth, width and time.

The document is built from libyaml's event stream by a loop, not by PyYAML's recursive
composer and constructor, so that

- anchors and aliases are refused outright (an alias "billion laughs" expands a 600-byte
  file into gigabytes of error text and memory);
- nesting deeper than :data:`MAX_DEPTH`, collections of more than :data:`MAX_ITEMS` entries
  and documents of more than :data:`MAX_NODES` values are refused (a real spec has a few
  hundred), and nothing recurses (no ``RecursionError`` at 500 levels);
- mapping keys must be scalars (``? [k1, k2]`` is refused) and unique;
- explicit tags other than ``!!str``, ``!!seq`` and ``!!map`` are refused (``!!float abc``
  and ``!!bool maybe`` crash PyYAML's constructors; a spec needs none of them);
- numbers are at most :data:`MAX_NUMBER_CHARS` characters (a 5,000-digit int or a sexagesimal
  ``1:2:3:...`` of a megabyte costs quadratic time), dates and merge keys stay plain text.

Every refusal is a :class:`RefusedYaml` (a :class:`yaml.MarkedYAMLError`) with the line and
column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
)

from stockade.spec.problems import excerpt

MAX_DEPTH = 16
MAX_ITEMS = 1000
MAX_NODES = 20_000
MAX_NUMBER_CHARS = 32

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CORE = "tag:yaml.org,2002:"
_STR, _SEQ, _MAP = f"{_CORE}str", f"{_CORE}seq", f"{_CORE}map"
_CONSTRUCTED = {f"{_CORE}{t}" for t in ("null", "bool", "int", "float")}
_NUMBERS = {f"{_CORE}int", f"{_CORE}float"}
_NO_KEY = object()


class RefusedYaml(yaml.MarkedYAMLError):
    """A construct that YAML allows but a job spec does not."""


@dataclass
class _Open:
    """A mapping or sequence being built, and (for a mapping) the key awaiting its value."""

    value: dict[Any, Any] | list[Any]
    key: Any = _NO_KEY
    seen: set[Any] = field(default_factory=set)


class TooManyNodes(Exception):
    """The document has more values than the caller's budget (``load_document(limit=)``)."""


def load_document(data: bytes | str, limit: int | None = None) -> Any:
    """The single YAML document in ``data`` as plain Python values (``None`` if empty);
    :class:`TooManyNodes` past ``limit`` values, before building more."""
    loader = _Loader(data)
    try:
        return _build(loader, limit)
    finally:
        loader.dispose()


def _build(loader: Any, limit: int | None = None) -> Any:  # CSafeLoader or SafeLoader
    stack: list[_Open] = []
    root: Any = None
    documents = nodes = 0
    while loader.check_event():
        event = loader.get_event()
        if isinstance(event, DocumentStartEvent):
            documents += 1
            if documents > 1:
                _refuse("a job spec is one YAML document; remove the second '---'", event)
        elif isinstance(event, NodeEvent):
            nodes += 1
            if limit is not None and nodes > limit:
                raise TooManyNodes
            value = _node(loader, event, depth=len(stack), count=nodes)
            if stack:
                _add(stack[-1], value, event)
            else:
                root = value
            if isinstance(event, CollectionStartEvent):
                stack.append(_Open(value))
        elif isinstance(event, CollectionEndEvent):
            stack.pop()
    return root


def _node(loader: Any, event: NodeEvent, *, depth: int, count: int) -> Any:
    """The value of one node (an empty container for a collection), once it passed the
    checks that keep a spec plain and small."""
    if isinstance(event, AliasEvent):
        anchor = _short(event.anchor, quote=False)
        _refuse(f"aliases (*{anchor}) are not allowed in a job spec; write the value out", event)
    if count > MAX_NODES:
        _refuse(f"more than {MAX_NODES} values are too many for a job spec", event)
    _check_node(event)
    if isinstance(event, ScalarEvent):
        return _scalar(loader, event)
    if depth >= MAX_DEPTH:
        _refuse(f"nested deeper than {MAX_DEPTH} levels; a job spec needs few", event)
    return {} if isinstance(event, MappingStartEvent) else []


def _check_node(event: NodeEvent) -> None:
    if event.anchor is not None:
        _refuse(f"anchors (&{_short(event.anchor, quote=False)}) are not allowed in a job spec; "
                "write each value out", event)
    tag = getattr(event, "tag", None)
    if tag not in (None, "!", _STR, _SEQ, _MAP):
        shown = _short(tag.replace(_CORE, "!!", 1), quote=False)
        _refuse(f"the tag {shown} is not allowed in a job spec; "
                "remove it (quote a value to make it text)", event)


def _scalar(loader: Any, event: ScalarEvent) -> Any:
    tag = event.tag
    if tag is None:
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag not in _CONSTRUCTED:
        return event.value  # text; also dates, '<<' and '=' (no timestamp or merge magic)
    if tag in _NUMBERS and len(event.value) > MAX_NUMBER_CHARS:
        _refuse(f"a number of {len(event.value)} characters is too long for a job spec; "
                "quote it if it is meant as text", event)
    node = yaml.ScalarNode(tag, event.value)
    try:
        return loader.yaml_constructors[tag](loader, node)
    except (ValueError, OverflowError):
        _refuse(f"{_short(event.value)} is not a valid number; quote it if it is meant as text",
                event)


def _add(parent: _Open, value: Any, event: NodeEvent) -> None:
    if isinstance(parent.value, list):
        if len(parent.value) >= MAX_ITEMS:
            _refuse(f"a list of more than {MAX_ITEMS} items is too long for a job spec", event)
        parent.value.append(value)
    elif parent.key is _NO_KEY:
        if not isinstance(event, ScalarEvent):
            _refuse("a mapping key must be a plain value, not a list or mapping", event)
        if value in parent.seen:
            _refuse(f"duplicate key {_short(value)}", event)
        if len(parent.seen) >= MAX_ITEMS:
            _refuse(f"a mapping of more than {MAX_ITEMS} keys is too large for a job spec",
                    event)
        parent.seen.add(value)
        parent.key = value
    else:
        parent.value[parent.key] = value
        parent.key = _NO_KEY


def _short(value: Any, *, quote: bool = True) -> str:
    text = excerpt(value, 40)
    return text if quote else text.strip("'\"")


def _refuse(problem: str, event: Any) -> NoReturn:
    raise RefusedYaml(problem=problem, problem_mark=event.start_mark)
