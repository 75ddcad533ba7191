"""Load and validate the TOML configuration into frozen dataclasses.

The file is read once with ``tomllib``. Every mistake (bad TOML, unknown key, wrong type,
value out of range) becomes one :class:`~bulkrunner.errors.ConfigError` that names the file,
the key and the fix. Task *import* happens later, in :mod:`bulkrunner.server.tasks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bulkrunner.errors import ConfigError

DEFAULT_PORT = 8470
CONFIG_ENV = "BULKRUNNER_CONFIG"
TOKEN_ENV = "BULKRUNNER_TOKEN"
URL_ENV = "BULKRUNNER_URL"
EXECUTOR_TYPES = ("thread", "process", "dask")


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table: where it listens, its token and its limits."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int = 8
    token: str = ""
    token_file: str = ""
    max_body_size: int = 32 * 1024 * 1024
    connection_limit: int = 200
    shutdown_grace: float = 10.0
    allowed_hosts: tuple[str, ...] = ()


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
class TaskConfig:
    """One ``[tasks]`` entry: a name and the ``module:function`` it runs."""

    name: str
    path: str
    timeout: float | None = None
    max_attempts: int | None = None
    doc: str | None = None


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``source`` is the file it came from, or None for defaults."""

    server: ServerConfig = field(default_factory=ServerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    tasks: tuple[TaskConfig, ...] = ()
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
        cfg = self
        for name, values in sections.items():
            values = {k: v for k, v in values.items() if v is not None}
            if values:
                cfg = replace(cfg, **{name: replace(getattr(cfg, name), **values)})
        _validate(cfg, cfg.source or "<command line>")
        return cfg


_SECTIONS: dict[str, type] = {"server": ServerConfig, "executor": ExecutorConfig,
                              "store": StoreConfig, "jobs": JobsConfig,
                              "retention": RetentionConfig}
_TASK_KEYS = {"path": str, "timeout": float, "max_attempts": int, "doc": str}
_RESERVED_TASK_KEYS = {"default", "builtins", "pythonpath"}


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
        return _apply_env(Config())
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
    return _apply_env(config_from_dict(data, source=name, base_dir=p.resolve().parent))


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>",
                     base_dir: Path | None = None) -> Config:
    """Build a validated Config from parsed TOML (also the test seam)."""
    unknown = set(data) - set(_SECTIONS) - {"tasks"}
    for key in sorted(unknown):
        raise ConfigError(f"unknown section{_suggest(key, [*_SECTIONS, 'tasks'])}",
                          file=source, key=key)
    kwargs: dict[str, Any] = {}
    for sec, cls in _SECTIONS.items():
        table = data.get(sec, {})
        if not isinstance(table, dict):
            raise ConfigError(f"must be a table like [{sec}]", file=source, key=sec)
        if cls is RetentionConfig:
            table = {k: parse_duration(v, f"{sec}.{k}", source) for k, v in table.items()}
        kwargs[sec] = _build(cls, table, sec, source)
    if base_dir is not None:
        store = kwargs["store"]
        if not Path(store.path).is_absolute():
            kwargs["store"] = replace(store, path=str(base_dir / store.path))
        server = kwargs["server"]
        if server.token_file and not Path(server.token_file).is_absolute():
            kwargs["server"] = replace(server, token_file=str(base_dir / server.token_file))
    tasks, default, builtins = _parse_tasks(data.get("tasks", {}), source)
    pythonpath = _parse_pythonpath(data.get("tasks", {}).get("pythonpath", []), source,
                                   base_dir)
    cfg = Config(tasks=tasks, default_task=default, builtins=builtins, source=source,
                 pythonpath=pythonpath,
                 config_dir=str(base_dir.resolve()) if base_dir is not None else None,
                 **kwargs)
    _validate(cfg, source)
    return cfg


def _build(cls: type, table: dict[str, Any], sec: str, source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"unknown key{_suggest(key, list(fields))}",
                              file=source, key=f"{sec}.{key}")
        values[key] = _typed(value, type(getattr(cls(), key)), f"{sec}.{key}", source)
    return cls(**values)


def _typed(value: Any, want: type, key: str, source: str) -> Any:
    if want is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'must be a list of names in quotes, like ["a.example"], not '
                              f"{value!r}", file=source, key=key)
        return tuple(v.strip().lower() for v in value if v.strip())
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
        names = {str: "a string in quotes", int: "a whole number", float: "a number",
                 bool: "true or false"}
        raise ConfigError(f"must be {names.get(want, want.__name__)}, not {value!r}",
                          file=source, key=key)
    return value


def _parse_tasks(table: Any, source: str) -> tuple[tuple[TaskConfig, ...], str | None, bool]:
    if not isinstance(table, dict):
        raise ConfigError("must be a table like [tasks]", file=source, key="tasks")
    default = table.get("default", "echo")
    if not isinstance(default, str):
        raise ConfigError("must be the name of a task, in quotes", file=source,
                          key="tasks.default")
    builtins = _typed(table.get("builtins", True), bool, "tasks.builtins", source)
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
                raise ConfigError(f"unknown key{_suggest(k, list(_TASK_KEYS))}",
                                  file=source, key=f"{key}.{k}")
        if "path" not in entry:
            raise ConfigError('needs path = "module:function"', file=source, key=f"{key}.path")
        vals = {k: _typed(v, _TASK_KEYS[k], f"{key}.{k}", source) for k, v in entry.items()}
        out.append(TaskConfig(name=name, **vals))
    for t in out:
        module, sep, func = t.path.partition(":")
        if not sep or not module or not func:
            raise ConfigError(f'must be "module:function", not {t.path!r}', file=source,
                              key=f"tasks.{t.name}")
    return tuple(out), (default or None), builtins


def _parse_pythonpath(value: Any, source: str, base_dir: Path | None) -> tuple[str, ...]:
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


def _validate(cfg: Config, source: str) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(msg, file=source, key=key)

    need(0 <= cfg.server.port <= 65535, "server.port", "must be between 0 and 65535")
    need(cfg.server.threads >= 1, "server.threads", "must be at least 1")
    need(cfg.server.max_body_size >= 1024, "server.max_body_size", "must be at least 1024")
    need(cfg.server.connection_limit >= 1, "server.connection_limit", "must be at least 1")
    need(cfg.server.shutdown_grace >= 0, "server.shutdown_grace", "must be 0 or more seconds")
    need(cfg.executor.type in EXECUTOR_TYPES, "executor.type",
         f"must be one of {', '.join(EXECUTOR_TYPES)}, not {cfg.executor.type!r}")
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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any, key: str = "duration", source: str | None = None) -> Any:
    """Seconds from ``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or a number.

    Anything else is returned as is, for the type check to name.
    """
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ConfigError(f'must be a number of seconds or an age like "7d", "12h", "30m" '
                          f"or \"45s\", not {value!r}", file=source, key=key) from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ConfigError(f"must be a finite age, not {value!r}", file=source, key=key)
    return seconds


def _apply_env(cfg: Config) -> Config:
    """``$BULKRUNNER_TOKEN`` wins over the file; a token file is read here, once."""
    token = os.environ.get(TOKEN_ENV) or cfg.server.token
    if not token and cfg.server.token_file:
        try:
            token = Path(cfg.server.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file ({e.strerror})",
                              file=cfg.source, key="server.token_file") from None
    if token != cfg.server.token:
        cfg = replace(cfg, server=replace(cfg.server, token=token))
    return cfg


@functools.lru_cache(maxsize=256)
def host_is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return f"{hint} Known keys: {', '.join(options)}."
