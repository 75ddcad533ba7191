"""The ``[schedules.NAME]`` tables and the ``[notify]`` table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bulkrunner.config.tables import NotifyConfig, ScheduleConfig
from bulkrunner.config.values import parse_duration, suggest, typed
from bulkrunner.errors import ConfigError

_SCHEDULE_KEYS = {"task": str, "cron": str, "every": float, "timezone": str, "params": dict,
                  "priority": int, "enabled": bool}
_NOTIFY_KEYS = {"secret": str, "secret_file": str, "allowed": tuple, "max_attempts": int,
                "timeout": float}


def parse_schedules(table: Any, source: str) -> tuple[ScheduleConfig, ...]:
    """Each ``[schedules.NAME]`` table, its keys checked by type (the cron expression and
    the time zone are checked by :func:`bulkrunner.config.validate.validate`)."""
    if not isinstance(table, dict):
        raise ConfigError("must be tables like [schedules.nightly]", file=source,
                          key="schedules")
    out = []
    for name, entry in table.items():
        key = f"schedules.{name}"
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("schedule names use letters, digits, '-' and '_' only",
                              file=source, key=key)
        if not isinstance(entry, dict):
            raise ConfigError('must be a table with task and cron or every, like '
                              '[schedules.nightly] task = "report" cron = "0 3 * * *"',
                              file=source, key=key)
        for k in entry:
            if k not in _SCHEDULE_KEYS:
                raise ConfigError(f"unknown key{suggest(k, list(_SCHEDULE_KEYS))}",
                                  file=source, key=f"{key}.{k}")
        if "task" not in entry:
            raise ConfigError('needs task = "<a task name>"', file=source, key=f"{key}.task")
        vals = {k: typed(parse_duration(v, f"{key}.{k}", source) if k == "every" else v,
                         _SCHEDULE_KEYS[k], f"{key}.{k}", source) for k, v in entry.items()}
        out.append(ScheduleConfig(name=name, **vals))
    return tuple(out)


def parse_notify(table: Any, source: str, base_dir: Path | None) -> NotifyConfig:
    """The ``[notify]`` table; a relative ``secret_file`` is relative to the config file."""
    if not isinstance(table, dict):
        raise ConfigError("must be a table like [notify]", file=source, key="notify")
    vals: dict[str, Any] = {}
    for k, v in table.items():
        if k not in _NOTIFY_KEYS:
            raise ConfigError(f"unknown key{suggest(k, list(_NOTIFY_KEYS))}",
                              file=source, key=f"notify.{k}")
        if k == "allowed":
            if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
                raise ConfigError('must be a list of URL prefixes in quotes, like '
                                  f'["https://hooks.example.com/"], not {v!r}',
                                  file=source, key="notify.allowed")
            vals[k] = tuple(v)
            continue
        vals[k] = typed(v, _NOTIFY_KEYS[k], f"notify.{k}", source)
    secret_file = vals.get("secret_file", "")
    if secret_file and base_dir is not None and not Path(secret_file).is_absolute():
        vals["secret_file"] = str(base_dir / secret_file)
    return NotifyConfig(**vals)
