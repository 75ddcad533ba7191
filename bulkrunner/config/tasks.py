"""The ``[tasks]`` table: registered tasks, their limits, and where their modules are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bulkrunner.config.tables import Rate, TaskConfig
from bulkrunner.config.values import parse_rate, suggest, typed
from bulkrunner.errors import ConfigError

#: The tasks ``[tasks] builtins = true`` adds (their modules live in bulkrunner.builtin).
BUILTIN_TASKS = ("echo", "sleep", "fail")
_TASK_KEYS = {"path": str, "timeout": float, "max_attempts": int, "doc": str,
              "concurrency": int, "rate_limit": str, "notify": str}
_RESERVED_TASK_KEYS = {"default", "builtins", "pythonpath"}


def parse_tasks(table: Any, source: str) -> tuple[tuple[TaskConfig, ...], str | None, bool]:
    """The task entries, the default task's name and whether the built-ins are added."""
    if not isinstance(table, dict):
        raise ConfigError("must be a table like [tasks]", file=source, key="tasks")
    default = table.get("default", "echo")
    if not isinstance(default, str):
        raise ConfigError("must be the name of a task, in quotes", file=source,
                          key="tasks.default")
    builtins = typed(table.get("builtins", True), bool, "tasks.builtins", source)
    out = []
    for name, entry in table.items():
        if name in _RESERVED_TASK_KEYS:
            continue
        key = f"tasks.{name}"
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("task names use letters, digits, '-' and '_' only",
                              file=source, key=key)
        if isinstance(entry, str):
            out.append(TaskConfig(name=name, path=entry))
            continue
        if not isinstance(entry, dict):
            raise ConfigError('must be "module:function" or a table with a path key',
                              file=source, key=key)
        for k in entry:
            if k not in _TASK_KEYS:
                raise ConfigError(f"unknown key{suggest(k, list(_TASK_KEYS))}",
                                  file=source, key=f"{key}.{k}")
        if "path" not in entry:
            raise ConfigError('needs path = "module:function"', file=source, key=f"{key}.path")
        vals = {k: typed(v, _TASK_KEYS[k], f"{key}.{k}", source) for k, v in entry.items()}
        rate = vals.pop("rate_limit", "")
        parsed = parse_rate(rate, f"{key}.rate_limit", source)
        out.append(TaskConfig(name=name, rate_limit=Rate(parsed[0], parsed[1], rate.strip())
                              if parsed else None, **vals))
    for t in out:
        module, sep, func = t.path.partition(":")
        if not sep or not module or not func:
            raise ConfigError(f'must be "module:function", not {t.path!r}', file=source,
                              key=f"tasks.{t.name}")
    return tuple(out), (default or None), builtins


def parse_pythonpath(value: Any, source: str, base_dir: Path | None) -> tuple[str, ...]:
    """``tasks.pythonpath``: existing directories, relative to the config file, made
    absolute (without a file, relative to the working directory)."""
    key = "tasks.pythonpath"
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'must be a list of directories in quotes, like ["lib"], not '
                          f"{value!r}", file=source, key=key)
    out: list[str] = []
    for entry in value:
        p = Path(entry).expanduser()
        if not p.is_absolute():
            p = (base_dir if base_dir is not None else Path.cwd()) / p
        p = p.resolve()
        if not p.is_dir():
            what = "is not a directory" if p.exists() else "does not exist"
            raise ConfigError(f"{entry!r} ({p}) {what}; create it or fix the path (a "
                              "relative path is relative to the config file)",
                              file=source, key=key)
        if str(p) not in out:
            out.append(str(p))
    return tuple(out)
