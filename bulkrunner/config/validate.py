"""Checks across the whole configuration: ranges, and names that must refer to something."""

from __future__ import annotations

import json
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bulkrunner.config.tables import Config, ScheduleConfig
from bulkrunner.config.tasks import BUILTIN_TASKS
from bulkrunner.errors import ConfigError


def validate(cfg: Config, source: str) -> None:
    """Raise a ConfigError naming the first key whose value cannot work."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(msg, file=source, key=key)

    need(0 <= cfg.server.port <= 65535, "server.port", "must be between 0 and 65535")
    need(cfg.server.threads >= 1, "server.threads", "must be at least 1")
    need(cfg.server.max_body_size >= 1024, "server.max_body_size", "must be at least 1024")
    need(cfg.server.connection_limit >= 1, "server.connection_limit", "must be at least 1")
    need(cfg.server.shutdown_grace >= 0, "server.shutdown_grace", "must be 0 or more seconds")
    need(cfg.server.trusted_proxies >= 0, "server.trusted_proxies",
         "must be 0 (no proxy) or the number of proxies in front, like 1")
    need(cfg.executor.type in ("thread", "process", "dask"), "executor.type",
         f"must be one of thread, process, dask, not {cfg.executor.type!r}")
    need(cfg.executor.max_workers >= 1, "executor.max_workers", "must be at least 1")
    need(bool(cfg.store.path), "store.path", "must name a database file")
    need(cfg.jobs.max_attempts >= 1, "jobs.max_attempts", "must be at least 1")
    need(cfg.jobs.timeout >= 0, "jobs.timeout", "must be 0 (none) or more seconds")
    need(cfg.jobs.max_queued >= 1, "jobs.max_queued", "must be at least 1")
    need(cfg.jobs.max_items >= 1, "jobs.max_items", "must be at least 1")
    need(cfg.jobs.retry_backoff >= 0, "jobs.retry_backoff", "must be 0 or more seconds")
    need(cfg.jobs.retry_backoff_max >= cfg.jobs.retry_backoff, "jobs.retry_backoff_max",
         "must be at least jobs.retry_backoff")
    need(cfg.jobs.max_param_size >= 2, "jobs.max_param_size", "must be at least 2 bytes")
    need(cfg.jobs.max_result_size >= 4, "jobs.max_result_size", "must be at least 4 bytes")
    need(cfg.jobs.max_log_size >= 0, "jobs.max_log_size",
         "must be 0 (capture nothing) or more bytes")
    need(cfg.jobs.max_error_size >= 256, "jobs.max_error_size", "must be at least 256 bytes")
    for name in ("succeeded", "failed", "cancelled"):
        need(getattr(cfg.retention, name) >= 0, f"retention.{name}",
             'must be 0 (keep forever) or an age like "7d"')
    need(cfg.retention.interval >= 1, "retention.interval", 'must be at least 1 second, '
         'like "5m"')
    for t in cfg.tasks:
        need(t.timeout is None or t.timeout >= 0, f"tasks.{t.name}.timeout",
             "must be 0 (none) or more seconds")
        need(t.max_attempts is None or t.max_attempts >= 1, f"tasks.{t.name}.max_attempts",
             "must be at least 1")
        need(t.concurrency >= 0, f"tasks.{t.name}.concurrency",
             "must be 0 (no limit of its own) or the number of items at once, like 2")
    need(cfg.notify.max_attempts >= 1, "notify.max_attempts", "must be at least 1")
    need(cfg.notify.timeout > 0, "notify.timeout", "must be more than 0 seconds")
    known = {t.name for t in cfg.tasks} | (set(BUILTIN_TASKS) if cfg.builtins else set())
    for s in cfg.schedules:
        validate_schedule(s, known, source)


#: A schedule's name goes into its jobs' idempotency keys (at most 200 characters).
MAX_SCHEDULE_NAME = 100
#: The priorities a submission may have.
MAX_PRIORITY = 1_000_000


def validate_schedule(s: ScheduleConfig, tasks: set[str], source: str) -> None:
    """A schedule names a known task, has exactly one of ``cron`` (five fields that can
    fire, in a known IANA time zone) and ``every`` (whole seconds, at least 1), a priority
    in range and params that JSON can carry."""
    key = f"schedules.{s.name}"
    if len(s.name) > MAX_SCHEDULE_NAME:
        raise ConfigError(f"schedule names have at most {MAX_SCHEDULE_NAME} characters",
                          file=source, key=key)
    if s.task not in tasks:
        raise ConfigError(f"names the task {s.task!r}, which is not in [tasks]; add it there "
                          "or fix the name", file=source, key=f"{key}.task")
    if bool(s.cron) == bool(s.every):
        raise ConfigError('needs exactly one of cron = "0 3 * * *" and every = "10m"',
                          file=source, key=key)
    if s.every and (s.every < 1 or s.every != int(s.every)):
        raise ConfigError(f'must be a whole number of seconds, at least 1, or a duration like '
                          f'"10m"; not {s.every:g}', file=source, key=f"{key}.every")
    if s.cron:
        _check_cron(s.cron, source, f"{key}.cron")
    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f'{s.timezone!r} is not a known IANA time zone; use a name like '
                          '"Europe/Paris", "America/New_York" or "UTC"', file=source,
                          key=f"{key}.timezone") from None
    if not -MAX_PRIORITY <= s.priority <= MAX_PRIORITY:
        raise ConfigError(f"must be from {-MAX_PRIORITY} to {MAX_PRIORITY}", file=source,
                          key=f"{key}.priority")
    try:
        json.dumps(s.params, allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError("must hold only strings, numbers, booleans, lists and tables (a "
                          "TOML date or time is not JSON: write it in quotes)", file=source,
                          key=f"{key}.params") from None


def _check_cron(expr: str, source: str, key: str) -> None:
    """Five fields (minute hour day-of-month month day-of-week) that croniter accepts and
    that can fire (no 30 February)."""
    if len(expr.split()) != 5:
        raise ConfigError(f"must have five fields (minute hour day-of-month month "
                          f'day-of-week), like "0 3 * * *"; not {expr!r}', file=source,
                          key=key)
    from croniter import croniter  # only a config with a cron schedule pays for it

    try:
        croniter.expand(expr, strict=True)
    except (ValueError, TypeError) as e:  # croniter's errors are ValueErrors
        raise ConfigError(f'{expr!r} is not a cron expression that can fire ({e}); fields '
                          'are minute 0-59, hour 0-23, day 1-31, month 1-12 or jan-dec, '
                          'weekday 0-7 or sun-sat', file=source, key=key) from None
