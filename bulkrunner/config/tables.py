"""The configuration as frozen dataclasses, one per TOML table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from bulkrunner.config.values import host_is_loopback

DEFAULT_PORT = 8470
EXECUTOR_TYPES = ("thread", "process", "dask")
ROLES = ("read", "submit", "admin")


@dataclass(frozen=True)
class TokenConfig:
    """One ``[[server.tokens]]`` entry: a named token with a role."""

    name: str
    token: str = ""
    token_file: str = ""
    role: str = "read"


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table: where it listens, its tokens and its limits."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int = 8
    token: str = ""
    token_file: str = ""
    max_body_size: int = 32 * 1024 * 1024
    connection_limit: int = 200
    shutdown_grace: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
    #: X-Forwarded-* hops to trust (a reverse proxy in front); 0 = none.
    trusted_proxies: int = 0
    tokens: tuple[TokenConfig, ...] = ()

    @property
    def is_loopback(self) -> bool:
        """True when the server listens on a loopback address only."""
        return host_is_loopback(self.host)


@dataclass(frozen=True)
class ExecutorConfig:
    """The ``[executor]`` table: where items run and how many at a time."""

    type: str = "thread"
    max_workers: int = 4
    address: str = ""
    #: Queued items of equal priority take turns by job (round robin); False = FIFO.
    fair_share: bool = True


@dataclass(frozen=True)
class StoreConfig:
    """The ``[store]`` table: the SQLite file."""

    path: str = "bulkrunner.db"


@dataclass(frozen=True)
class JobsConfig:
    """The ``[jobs]`` table: defaults and limits for jobs and their items."""

    max_attempts: int = 1
    timeout: float = 0.0
    max_queued: int = 1_000_000
    max_items: int = 100_000
    max_param_size: int = 1024 * 1024
    max_result_size: int = 1024 * 1024
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    max_log_size: int = 64 * 1024
    max_error_size: int = 64 * 1024


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished jobs are kept, in seconds by final state (0 = forever), and how
    often the server deletes the older ones. The file may say "7d", "12h", "30m", "45s"."""

    succeeded: float = 7 * 86400.0
    failed: float = 30 * 86400.0
    cancelled: float = 7 * 86400.0
    interval: float = 300.0


@dataclass(frozen=True)
class Rate:
    """A rate limit: at most ``count`` starts in any window of ``per`` seconds."""

    count: int
    per: float
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class TaskConfig:
    """One ``[tasks]`` entry: a name, the ``module:function`` it runs, and its own
    defaults and limits."""

    name: str
    path: str
    timeout: float | None = None
    max_attempts: int | None = None
    doc: str | None = None
    #: Items of this task running at once, server-wide; 0 = no limit of its own.
    concurrency: int = 0
    #: Item starts allowed per window, server-wide; None = no limit.
    rate_limit: Rate | None = None
    #: Where to POST each finished job of this task ("" = nowhere).
    notify: str = ""


@dataclass(frozen=True)
class ScheduleConfig:
    """One ``[schedules.NAME]`` table: a task submitted at set times."""

    name: str
    task: str
    cron: str = ""
    every: float = 0.0
    timezone: str = "UTC"
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    enabled: bool = True


@dataclass(frozen=True)
class NotifyConfig:
    """The ``[notify]`` table: completion webhooks."""

    secret: str = ""
    secret_file: str = ""
    allowed: tuple[str, ...] = ()
    max_attempts: int = 8
    timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``source`` is the file it came from, or None for defaults."""

    server: ServerConfig = field(default_factory=ServerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    tasks: tuple[TaskConfig, ...] = ()
    schedules: tuple[ScheduleConfig, ...] = ()
    default_task: str | None = "echo"
    builtins: bool = True
    source: str | None = None
    #: ``[tasks] pythonpath``: more directories for task imports, made absolute.
    pythonpath: tuple[str, ...] = ()
    #: The directory of the config file (absolute), or None without a file.
    config_dir: str | None = None

    def import_dirs(self) -> list[str]:
        """Where task modules are looked for before the rest of ``sys.path``, in order: the
        config file's directory, the working directory, then ``tasks.pythonpath``."""
        dirs = [self.config_dir, os.getcwd(), *self.pythonpath]
        return list(dict.fromkeys(d for d in dirs if d))

    def task(self, name: str) -> TaskConfig | None:
        """The ``[tasks]`` entry of ``name`` (None for a built-in task or an unknown one)."""
        for t in self.tasks:
            if t.name == name:
                return t
        return None

    @property
    def url(self) -> str:
        """The URL a client on this machine uses to reach the server."""
        host = self.server.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"

    def with_overrides(self, **sections: dict[str, Any]) -> Config:
        """A copy with some section fields replaced (the ``serve`` options), re-validated."""
        from bulkrunner.config.validate import validate

        cfg = self
        for name, values in sections.items():
            values = {k: v for k, v in values.items() if v is not None}
            if values:
                cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
        validate(cfg, cfg.source or "<command line>")
        return cfg
