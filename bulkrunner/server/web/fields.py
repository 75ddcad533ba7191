"""Form fields for a task's params, from the schema GET /api/v1/tasks gives.

Each param becomes one widget: a select for choices (``Literal`` or ``Enum``), a checkbox
for ``bool``, a number input for ``int`` and ``float``, a text input for ``str`` and ``any``,
and a JSON text area for ``list`` and ``dict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_TYPE_HELP = {"int": "whole number", "float": "number", "str": "text",
              "bool": "true or false", "list": "JSON list", "dict": "JSON object",
              "any": "JSON value or text"}
_PLACEHOLDER = {"list": '["a", "b"]', "dict": '{"key": "value"}'}


@dataclass(frozen=True)
class Option:
    """One choice of a select: its JSON-encoded value and its label."""

    value: str
    label: str
    selected: bool


@dataclass(frozen=True)
class FormField:
    """What the template needs to draw one param's control."""

    name: str
    kind: str                      # select | checkbox | number | text | json
    type: str
    required: bool
    default_json: str              # the default as JSON, "null" when there is none
    value: str = ""
    checked: bool = False
    step: str = ""
    placeholder: str = ""
    help: str = ""
    options: list[Option] = field(default_factory=list)


def form_fields(params: list[dict[str, Any]]) -> list[FormField]:
    """One :class:`FormField` per param of a task's schema, in signature order."""
    return [_field(p) for p in params]


def _field(p: dict[str, Any]) -> FormField:
    name, typ, required = p["name"], p.get("type", "any"), bool(p.get("required", True))
    default = p.get("default")
    base: dict[str, Any] = {"name": name, "type": typ, "required": required,
                            "default_json": json.dumps(default)}
    choices = p.get("choices")
    if choices is not None:
        options = [Option(json.dumps(c), str(c), not required and c == default)
                   for c in choices]
        if required or default is None:
            # An empty first option sends nothing: the server then reports a missing
            # required param, or the function's own default (None) applies.
            blank = "choose one" if required else "(none)"
            options.insert(0, Option("", blank, not any(o.selected for o in options)))
        return FormField(kind="select", options=options,
                         help="one of " + ", ".join(str(c) for c in choices), **base)
    if typ == "bool":
        return FormField(kind="checkbox", checked=default is True, help=_help(p), **base)
    shown = "" if default is None else default
    if typ in ("int", "float"):
        return FormField(kind="number", value=str(shown), step="1" if typ == "int" else "any",
                         help=_help(p), **base)
    if typ in ("list", "dict"):
        return FormField(kind="json", value="" if default is None else json.dumps(default),
                         placeholder=_PLACEHOLDER[typ], help=_help(p), **base)
    if typ == "any" and default is not None and not isinstance(default, str):
        shown = json.dumps(default)
    return FormField(kind="text", value=str(shown), help=_help(p), **base)


def _help(p: dict[str, Any]) -> str:
    typ: str = p.get("type", "any")
    text = _TYPE_HELP.get(typ, typ)
    if typ == "list" and p.get("item_type"):
        text = f"JSON list of {_TYPE_HELP.get(p['item_type'], p['item_type'])} values"
    if p.get("nullable"):
        text += ", or empty for none"
    return text
