"""bulkrunner inside your own Flask app: ``BulkRunner(app)``, or ``BulkRunner()`` and
``runner.init_app(app)`` in an app factory.

The extension mounts the server's routes (the JSON API, ``/healthz``, ``/metrics``,
``/openapi.json`` and the web page) under ``url_prefix``, and gives the app
``runner.submit``, ``runner.get`` and ``runner.cancel``: the same service the API uses,
called in-process, with the API's errors raised as :mod:`bulkrunner.errors` exceptions.

Configuration: ``app.config["BULKRUNNER"]``, a dict holding the tables of the TOML file
(relative paths in it are relative to the app's instance folder), or
``app.config["BULKRUNNER_CONFIG"]``, the path of a TOML file; else ``$BULKRUNNER_CONFIG``,
``./bulkrunner.toml`` or the defaults, as for ``bulkrunner serve``. Either is checked when
the extension is set up, with the same messages as the file. Task modules are imported
later, when the service starts, so they may import the app.

The service starts in each process on its first use: the process's first request (to any
route of the app), its first ``runner`` call, or :meth:`BulkRunner.start`. A server that
forks after loading the app (gunicorn ``--preload``, uWSGI without ``lazy-apps``) forks
before any of these, so every worker starts its own after the fork, and nothing of SQLite
or of the dispatcher's threads crosses a fork. Several processes of one app share the
database: every one may submit, one at a time dispatches (:mod:`bulkrunner.server.lease`).

Tasks run on the thread executor inside ``app.app_context()``, a new one for each item:
``current_app`` and ``flask.g`` work in them, and the app's teardown functions (which
remove a Flask-SQLAlchemy session) run after each. On the process and Dask executors items
run in other processes, without the app.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, current_app, has_app_context

from bulkrunner.config import Config, apply_env, config_from_dict, load_config
from bulkrunner.errors import BulkrunnerError, ConfigError
from bulkrunner.server.app import mount
from bulkrunner.server.metrics import Metrics
from bulkrunner.server.service import Service
from bulkrunner.server.web.auth import Sessions

log = logging.getLogger("bulkrunner.flask")

#: The key of the extension's state in ``app.extensions``.
EXTENSION = "bulkrunner"
#: The app config keys read: the tables as a dict, or the path of a TOML file.
CONFIG_KEY = "BULKRUNNER"
CONFIG_FILE_KEY = "BULKRUNNER_CONFIG"


def app_config(app: Flask) -> Config:
    """The validated config of ``app``, from ``app.config["BULKRUNNER"]`` or
    ``app.config["BULKRUNNER_CONFIG"]`` (else found as ``bulkrunner serve`` finds it).

    Raises:
        ConfigError: naming where, the key and the fix.
    """
    data = app.config.get(CONFIG_KEY)
    path = app.config.get(CONFIG_FILE_KEY)
    source = f'app.config["{CONFIG_KEY}"]'
    if data is not None and path:
        raise ConfigError(f'set {source} (the tables) or app.config["{CONFIG_FILE_KEY}"] (a '
                          "TOML file), not both", file="app.config")
    if data is None:
        return load_config(path or None)
    if not isinstance(data, Mapping):
        raise ConfigError('must be a dict of the config tables, like {"store": {"path": '
                          '"jobs.db"}, "tasks": {"resize": "myapp.images:resize"}}',
                          file=source)
    cfg = apply_env(config_from_dict(dict(data), source=source,
                                     base_dir=Path(app.instance_path)))
    if Path(cfg.store.path).parent == Path(app.instance_path):
        os.makedirs(app.instance_path, exist_ok=True)  # as Flask-SQLAlchemy does
    return cfg


class Mount:
    """What the extension keeps for one app (``app.extensions["bulkrunner"]``): its
    config, the web page's sessions, and this process's service, made and started on first
    use (again in a process forked from one that had one)."""

    def __init__(self, app: Flask, cfg: Config) -> None:
        self.cfg = cfg
        #: The blueprint of the mounted routes (named ``bulkrunner``).
        self.blueprint: Blueprint | None = None
        #: The page's login sessions (kept in this process's memory).
        self.sessions = Sessions()
        self._item_context = app.app_context
        self._lock = threading.Lock()
        self._service: Service | None = None
        self._metrics: Metrics | None = None
        self._pid = 0
        self._failed = False
        # What a fork copied from the parent: never used in the child (SQLite connections
        # must not cross a fork) and never closed there (closing would checkpoint the
        # parent's write-ahead log from the child); kept so it is not collected either.
        self._inherited: list[Service] = []
        os.register_at_fork(after_in_child=functools.partial(_forked, weakref.ref(self)))

    @property
    def service(self) -> Service:
        """This process's service (started now if it was not)."""
        svc = self._service
        return svc if svc is not None else self.start()

    @property
    def metrics(self) -> Metrics:
        """This process's metrics."""
        self.service  # noqa: B018  (starts it)
        assert self._metrics is not None
        return self._metrics

    @property
    def started(self) -> bool:
        """Whether this process's service runs."""
        return self._service is not None

    def start(self) -> Service:
        """Start this process's service, if it has none: dispatching, or standing by while
        another process of the app dispatches.

        Raises:
            ConfigError: a task cannot be imported, the database cannot be opened.
        """
        with self._lock:
            if self._service is None:
                svc = Service(self.cfg, item_context=self._item_context)
                metrics = Metrics(svc)  # before it starts, so its first events count
                try:
                    svc.start()
                except BaseException:
                    svc.close(grace=0)
                    raise
                self._service, self._metrics, self._pid = svc, metrics, os.getpid()
                atexit.register(self._at_exit)
                if self.cfg.executor.type != "thread":
                    log.warning("executor.type is %r: tasks run in other processes, "
                                "without the app context (current_app, g, the app's "
                                "extensions); only the thread executor provides it",
                                self.cfg.executor.type)
            return self._service

    def start_quietly(self) -> None:
        """Start the service on the app's first request in this process. An error is logged
        (once) and the request goes on: the app's own routes do not need bulkrunner, and the
        mounted routes and ``runner`` calls raise it themselves."""
        if self._service is not None or self._failed:
            return
        try:
            self.start()
        except (BulkrunnerError, OSError):
            self._failed = True
            log.exception("bulkrunner could not start in this process (pid %d); its routes "
                          "and runner calls answer with the error", os.getpid())

    def close(self, grace: float | None = None) -> None:
        """Stop this process's service: no new work, running items get ``grace`` seconds
        (``server.shutdown_grace`` by default), then the lease is given up and the database
        closed. What did not finish runs again later, here or in another process."""
        with self._lock:
            svc, self._service = self._service, None
        atexit.unregister(self._at_exit)
        if svc is not None:
            svc.begin_drain()
            svc.close(grace)

    def _at_exit(self) -> None:
        # A worker that exits (gunicorn after SIGTERM) drains and gives its lease up, so a
        # standby takes over at once rather than when the lease runs out.
        if self._pid == os.getpid():
            self.close()

    def _forked(self) -> None:
        self._lock = threading.Lock()  # held by a thread of the parent, maybe
        if self._service is not None:
            self._inherited.append(self._service)
        self._service = self._metrics = None
        self._failed = False
        atexit.unregister(self._at_exit)


def _forked(ref: weakref.ref[Mount]) -> None:
    found = ref()
    if found is not None:
        found._forked()


class BulkRunner:
    """The bulkrunner extension: ``BulkRunner(app, url_prefix="/bulkrunner")``.

    An extension object may serve several apps (``init_app`` each); its methods act on the
    current app (``flask.current_app``): call them in a request, in a task, or inside
    ``with app.app_context():``.
    """

    def __init__(self, app: Flask | None = None, *, url_prefix: str = "/bulkrunner") -> None:
        self.url_prefix = url_prefix.rstrip("/")
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Check the app's bulkrunner config, mount the routes under ``url_prefix``, and
        start the service at the app's first request in each process.

        Raises:
            ConfigError: the config is wrong (the message names where, the key and the fix).
        """
        if EXTENSION in app.extensions:
            raise RuntimeError("this app has bulkrunner set up already (one BulkRunner per "
                               "app)")
        cfg = app_config(app)
        state = Mount(app, cfg)
        app.extensions[EXTENSION] = state
        state.blueprint = mount(app, cfg, self.url_prefix)
        app.before_request(state.start_quietly)

    # ------------------------------------------------------------------ the service
    @property
    def service(self) -> Service:
        """The current app's service in this process (started on first use), for what the
        three calls below do not cover: ``retry``, ``items``, ``export``, ``pause``, ..."""
        return self._mount().service

    def submit(self, task: str | None, params: Mapping[str, Any] | None = None, *,
               items: Iterable[Mapping[str, Any]] | None = None, **options: Any
               ) -> dict[str, Any]:
        """Submit a job of ``task`` (None: the default task) and return it as the API does:
        committed to the database before this returns.

        ``options`` are the other fields of the API's submit body: ``priority``,
        ``max_attempts``, ``timeout``, ``key``, ``delay``, ``run_after``, ``notify_url``.
        An idempotent replay of ``key`` returns the original job.

        Raises:
            InvalidSubmission: an unknown task, bad params or items (``code``
                ``invalid_submission``, ``details["fields"]`` naming each field).
            KeyConflict, QueueFull, ShuttingDown, StoreUnwritable: as the API answers 409
                or 503.
        """
        body: dict[str, Any] = {**options, "params": dict(params) if params is not None
                                else {}}
        if task is not None:
            body["task"] = task
        if items is not None:
            body["items"] = [dict(i) if isinstance(i, Mapping) else i for i in items]
        job, _ = self.service.submit(body)
        return job.to_dict()

    def get(self, ident: str) -> dict[str, Any]:
        """The job with this id (or unique prefix), as the API shows it.

        Raises:
            NotFound, AmbiguousId: as the API answers 404 and 409.
        """
        return self.service.get(ident).to_dict()

    def cancel(self, ident: str) -> dict[str, Any]:
        """Cancel the job's unfinished items (running ones are stopped); returns the job.

        Raises:
            NotFound, AmbiguousId, JobFinished: as the API answers 404 and 409.
        """
        return self.service.cancel(ident).to_dict()

    # ------------------------------------------------------------------ lifecycle
    def start(self, app: Flask | None = None) -> None:
        """Start the service in this process now rather than at the first request: after
        loading the app in a server that does not fork afterwards, or in each worker after
        the fork (gunicorn's ``post_worker_init`` hook), so that a worker that has served
        no request yet already stands by to take dispatching over."""
        self._mount(app).start()

    def close(self, app: Flask | None = None, grace: float | None = None) -> None:
        """Stop the service in this process (as at exit): no new work, running items get
        ``grace`` seconds, the dispatcher lease goes to a standby."""
        self._mount(app).close(grace)

    def _mount(self, app: Flask | None = None) -> Mount:
        if app is None:
            if not has_app_context():
                raise RuntimeError("bulkrunner needs the app: call this in a request or a "
                                   "task, inside `with app.app_context():`, or pass the app")
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        found = app.extensions.get(EXTENSION)
        if not isinstance(found, Mount):
            raise RuntimeError("this app has no bulkrunner: call BulkRunner(app) or "
                               "runner.init_app(app) first")
        return found


__all__ = ["CONFIG_FILE_KEY", "CONFIG_KEY", "EXTENSION", "BulkRunner", "Mount", "app_config"]
