"""The ``[[server.tokens]]`` array: named tokens with a role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bulkrunner.config.tables import ROLES, TokenConfig
from bulkrunner.config.values import suggest, typed
from bulkrunner.errors import ConfigError

_TOKEN_KEYS = {"name": str, "token": str, "token_file": str, "role": str}


def parse_tokens(value: Any, source: str, base_dir: Path | None) -> tuple[TokenConfig, ...]:
    """Each named token, its keys checked (a relative ``token_file`` is relative to the
    config file; the file is read when the config is loaded)."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError('must be tables like [[server.tokens]] name = "ci" role = "submit"',
                          file=source, key="server.tokens")
    out: list[TokenConfig] = []
    for i, entry in enumerate(value):
        key = f"server.tokens[{i}]"
        for k in entry:
            if k not in _TOKEN_KEYS:
                raise ConfigError(f"unknown key{suggest(k, list(_TOKEN_KEYS))}",
                                  file=source, key=f"{key}.{k}")
        vals = {k: typed(v, _TOKEN_KEYS[k], f"{key}.{k}", source) for k, v in entry.items()}
        if not vals.get("name"):
            raise ConfigError('needs name = "<who uses it>" (it is shown as submitted_by)',
                              file=source, key=f"{key}.name")
        role = vals.get("role", "read")
        if role not in ROLES:
            raise ConfigError(f"must be one of {', '.join(ROLES)}, not {role!r}",
                              file=source, key=f"{key}.role")
        if bool(vals.get("token")) == bool(vals.get("token_file")):
            raise ConfigError("needs exactly one of token or token_file", file=source,
                              key=key)
        tf = vals.get("token_file", "")
        if tf and base_dir is not None and not Path(tf).is_absolute():
            vals["token_file"] = str(base_dir / tf)
        out.append(TokenConfig(**vals))
    names = [t.name for t in out]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"the token name {n!r} is used twice; names must be unique",
                              file=source, key="server.tokens")
    return tuple(out)
