"""The ``[[server.tokens]]`` array: named tokens with a role, and every token the server
accepts (``server.token`` is the admin token named ``"admin"``)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from bulkrunner.config.tables import ROLES, ServerConfig, TokenConfig
from bulkrunner.config.values import suggest, typed
from bulkrunner.errors import ConfigError

_TOKEN_KEYS = {"name": str, "token": str, "token_file": str, "role": str}
#: The name ``server.token`` goes by (it is shown as ``submitted_by``).
ADMIN_NAME = "admin"
# Names travel in log lines, response headers and query strings: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def parse_tokens(value: Any, source: str, base_dir: Path | None) -> tuple[TokenConfig, ...]:
    """Each named token, its keys checked (a relative ``token_file`` is relative to the
    config file; the file is read when the config is loaded, by :func:`read_token_files`)."""
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
        if not _NAME.fullmatch(vals["name"]):
            raise ConfigError(f"{vals['name'][:80]!r} is not a usable name: use 1 to 64 "
                              "letters, digits and . _ @ + - (starting with a letter or "
                              'digit), like "ci" or "alice@example.com"',
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


def read_token_files(server: ServerConfig, source: str | None) -> ServerConfig:
    """``server`` with each named token's ``token_file`` read (once, at load), checked
    against the other tokens: no two tokens may be the same secret (which name would
    have submitted?), and no named token may be called ``"admin"`` beside
    ``server.token``, which goes by that name."""
    tokens: list[TokenConfig] = []
    for i, t in enumerate(server.tokens):
        if t.token_file and not t.token:
            key = f"server.tokens[{i}].token_file"
            try:
                secret = Path(t.token_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
                raise ConfigError(f"cannot read the token file {t.token_file} ({why})",
                                  file=source, key=key) from None
            if not secret:
                raise ConfigError(f"the token file {t.token_file} is empty; put the token "
                                  "in it", file=source, key=key)
            t = replace(t, token=secret)
        tokens.append(t)
    out = replace(server, tokens=tuple(tokens))
    every = server_tokens(out)
    if server.token and any(t.name == ADMIN_NAME for t in tokens):
        raise ConfigError(f"a named token is called {ADMIN_NAME!r}, the name server.token "
                          "goes by; rename it or drop server.token", file=source,
                          key="server.tokens")
    secrets = [t.token for t in every]
    for t in every:
        if secrets.count(t.token) > 1:
            raise ConfigError(f"the token of {t.name!r} is also another token's; give each "
                              "name its own token", file=source, key="server.tokens")
    return out


def server_tokens(server: ServerConfig) -> tuple[TokenConfig, ...]:
    """Every token the server accepts: ``server.token`` as the admin token named
    ``"admin"``, then the named ones (a named token whose file was never read has no
    secret and is left out: it can match nothing)."""
    admin = (TokenConfig(name=ADMIN_NAME, token=server.token, role="admin"),) \
        if server.token else ()
    return (*admin, *(t for t in server.tokens if t.token))


def token_required(server: ServerConfig) -> bool:
    """True when any token is configured: then every request but ``/healthz`` needs one."""
    return bool(server.token or server.tokens)


def token_files(server: ServerConfig) -> list[str]:
    """The token files the configuration names (their modes are checked at start)."""
    return [f for f in (server.token_file, *(t.token_file for t in server.tokens)) if f]


def digest(token: str) -> bytes:
    """The SHA-256 of a token: what is compared and kept in memory instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


_table: tuple[ServerConfig | None, tuple[tuple[bytes, TokenConfig], ...]] = (None, ())


def token_digests(server: ServerConfig) -> tuple[tuple[bytes, TokenConfig], ...]:
    """(digest, token) for every token of :func:`server_tokens`, computed once per
    ``server`` configuration."""
    global _table
    cached_for, table = _table
    if cached_for is not server:
        table = tuple((digest(t.token), t) for t in server_tokens(server))
        _table = (server, table)
    return table
