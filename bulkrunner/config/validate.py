"""Checks across the whole configuration: ranges, and names that must refer to something."""

from __future__ import annotations

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


def validate_schedule(s: ScheduleConfig, tasks: set[str], source: str) -> None:
    """A schedule names a known task and has exactly one of ``cron`` and ``every``."""
    key = f"schedules.{s.name}"
    if s.task not in tasks:
        raise ConfigError(f"names the task {s.task!r}, which is not in [tasks]; add it there "
                          "or fix the name", file=source, key=f"{key}.task")
    if bool(s.cron) == bool(s.every):
        raise ConfigError('needs exactly one of cron = "0 3 * * *" and every = "10m"',
                          file=source, key=key)
    if s.every < 0:
        raise ConfigError('must be a positive duration like "10m"', file=source,
                          key=f"{key}.every")
