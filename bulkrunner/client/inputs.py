"""What the ``submit`` command reads: ``--param`` pairs and an items file."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bulkrunner.models import ParamSpec


def parse_params(pairs: tuple[str, ...], specs: Callable[[], dict[str, ParamSpec]]
                 ) -> dict[str, Any]:
    """``--param K=V`` (coerced by the task's type hint) and ``K:=JSON`` pairs as params."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if ":=" in pair and pair.index(":=") < pair.find("=") + 1:
            name, _, raw = pair.partition(":=")
            try:
                out[name] = json.loads(raw)
            except ValueError:
                raise click.BadParameter(f"{pair!r}: the value after ':=' must be JSON",
                                         param_hint="--param") from None
            continue
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r}: write K=V, or K:=JSON", param_hint="--param")
        spec = specs().get(name)
        if spec is None:
            out[name] = text  # unknown here: the server names the problem
            continue
        try:
            out[name] = spec.from_text(text)
        except ValueError as e:
            raise click.BadParameter(f"{name}: {e}", param_hint="--param") from None
    return out


def read_items(path: str) -> tuple[bytes, str]:
    """The bytes of an items file (``-``: standard input) and a name for its format."""
    if path == "-":
        return sys.stdin.buffer.read(), "stdin.jsonl"
    p = Path(path)
    try:
        return p.read_bytes(), p.name
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}",
                                 param_hint="--items") from None
