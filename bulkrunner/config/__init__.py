"""Load and validate the TOML configuration into frozen dataclasses.

The file is read once with ``tomllib``. Every mistake (bad TOML, unknown key, wrong type,
value out of range) becomes one :class:`~bulkrunner.errors.ConfigError` that names the file,
the key and the fix. Task *import* happens later, in :mod:`bulkrunner.server.tasks`.

- ``tables.py``: the dataclasses; ``values.py``: typed values, durations, rates;
- ``tasks.py``, ``schedules.py`` (and ``[notify]``), ``tokens.py``: their tables;
- ``validate.py``: the checks across the whole configuration.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from bulkrunner.config.schedules import parse_notify, parse_schedules
from bulkrunner.config.tables import (
    DEFAULT_PORT,
    EXECUTOR_TYPES,
    ROLES,
    Config,
    ExecutorConfig,
    JobsConfig,
    NotifyConfig,
    Rate,
    RetentionConfig,
    ScheduleConfig,
    ServerConfig,
    StoreConfig,
    TaskConfig,
    TokenConfig,
)
from bulkrunner.config.tasks import BUILTIN_TASKS, parse_pythonpath, parse_tasks
from bulkrunner.config.tokens import parse_tokens, read_token_files
from bulkrunner.config.validate import validate
from bulkrunner.config.values import (
    host_is_loopback,
    parse_duration,
    parse_rate,
    suggest,
    typed,
)
from bulkrunner.errors import ConfigError

CONFIG_ENV = "BULKRUNNER_CONFIG"
TOKEN_ENV = "BULKRUNNER_TOKEN"
URL_ENV = "BULKRUNNER_URL"

_SECTIONS: dict[str, type] = {"server": ServerConfig, "executor": ExecutorConfig,
                              "store": StoreConfig, "jobs": JobsConfig,
                              "retention": RetentionConfig}
_OTHER_SECTIONS = ("tasks", "schedules", "notify")


def find_config_file(explicit: str | None = None) -> Path | None:
    """``--config``, else ``$BULKRUNNER_CONFIG``, else ``./bulkrunner.toml``, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    local = Path("bulkrunner.toml")
    return local if local.is_file() else None


def load_config(path: str | os.PathLike[str] | None = None, *, search: bool = True) -> Config:
    """Load the config from ``path``; when it is None (and ``search``), from
    ``$BULKRUNNER_CONFIG``, then ``./bulkrunner.toml``, else the built-in defaults.

    Raises:
        ConfigError: naming the file, the key and the fix.
    """
    p = Path(path) if path is not None else (find_config_file() if search else None)
    if p is None:
        return apply_env(Config())
    name = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("the file does not exist; check the path given with --config "
                          f"or ${CONFIG_ENV}", file=name) from None
    except OSError as e:
        raise ConfigError(f"cannot read it ({e.strerror})", file=name) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("it is not UTF-8 text; save it as UTF-8", file=name) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"it is not valid TOML ({e}); fix the syntax at that line",
                          file=name) from None
    return apply_env(config_from_dict(data, source=name, base_dir=p.resolve().parent))


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>",
                     base_dir: Path | None = None) -> Config:
    """Build a validated Config from parsed TOML (also the test seam, and how an embedding
    Flask app gives its config)."""
    unknown = set(data) - set(_SECTIONS) - set(_OTHER_SECTIONS)
    for key in sorted(unknown):
        raise ConfigError(f"unknown section{suggest(key, [*_SECTIONS, *_OTHER_SECTIONS])}",
                          file=source, key=key)
    kwargs: dict[str, Any] = {}
    for sec, cls in _SECTIONS.items():
        table = data.get(sec, {})
        if not isinstance(table, dict):
            raise ConfigError(f"must be a table like [{sec}]", file=source, key=sec)
        if cls is RetentionConfig:
            table = {k: parse_duration(v, f"{sec}.{k}", source) for k, v in table.items()}
        tokens = None
        if cls is ServerConfig and "tokens" in table:
            table = dict(table)
            tokens = parse_tokens(table.pop("tokens"), source, base_dir)
        kwargs[sec] = _build(cls, table, sec, source)
        if tokens is not None:
            kwargs[sec] = replace(kwargs[sec], tokens=tokens)
    if base_dir is not None:
        store = kwargs["store"]
        if not Path(store.path).is_absolute():
            kwargs["store"] = replace(store, path=str(base_dir / store.path))
        server = kwargs["server"]
        if server.token_file and not Path(server.token_file).is_absolute():
            kwargs["server"] = replace(server, token_file=str(base_dir / server.token_file))
    tasks, default, builtins = parse_tasks(data.get("tasks", {}), source)
    pythonpath = parse_pythonpath(data.get("tasks", {}).get("pythonpath", []), source,
                                  base_dir)
    cfg = Config(tasks=tasks, default_task=default, builtins=builtins, source=source,
                 pythonpath=pythonpath,
                 schedules=parse_schedules(data.get("schedules", {}), source),
                 notify=parse_notify(data.get("notify", {}), source, base_dir),
                 config_dir=str(base_dir.resolve()) if base_dir is not None else None,
                 **kwargs)
    validate(cfg, source)
    return cfg


def _build(cls: type, table: dict[str, Any], sec: str, source: str) -> Any:
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields or key == "tokens":
            raise ConfigError(f"unknown key{suggest(key, list(fields))}",
                              file=source, key=f"{sec}.{key}")
        values[key] = typed(value, type(getattr(cls(), key)), f"{sec}.{key}", source)
    return cls(**values)


def apply_env(cfg: Config) -> Config:
    """``$BULKRUNNER_TOKEN`` wins over the file; token files (``server.token_file`` and
    each named token's) are read here, once."""
    token = os.environ.get(TOKEN_ENV) or cfg.server.token
    if not token and cfg.server.token_file:
        try:
            token = Path(cfg.server.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file ({e.strerror})",
                              file=cfg.source, key="server.token_file") from None
    if token != cfg.server.token:
        cfg = replace(cfg, server=replace(cfg.server, token=token))
    if cfg.server.tokens:
        cfg = replace(cfg, server=read_token_files(cfg.server, cfg.source))
    return cfg


__all__ = ["BUILTIN_TASKS", "CONFIG_ENV", "DEFAULT_PORT", "EXECUTOR_TYPES", "ROLES",
           "TOKEN_ENV", "URL_ENV", "Config", "ConfigError", "ExecutorConfig", "JobsConfig",
           "NotifyConfig", "Rate", "RetentionConfig", "ScheduleConfig", "ServerConfig",
           "StoreConfig", "TaskConfig", "TokenConfig", "apply_env", "config_from_dict",
           "find_config_file", "host_is_loopback", "load_config", "parse_duration",
           "parse_rate"]
