"""Run the app under waitress, with a clean stop on SIGTERM and Ctrl-C.

waitress installs no SIGTERM handler, so SIGTERM would kill it outright. Here the first
SIGTERM or Ctrl-C starts a drain: ``/healthz`` and new submissions answer 503, running items
get ``server.shutdown_grace`` seconds, then the server stops and exits 0; what did not finish
is re-queued and runs after the next start. A second signal stops at once.

The HTTP server itself (read deadlines against slow clients, errors in JSON) is
:mod:`bulkrunner.server.httpserver`; the log, :mod:`bulkrunner.server.serverlog`; the checks
before serving, :mod:`bulkrunner.server.preflight`.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

from bulkrunner.config import Config
from bulkrunner.config.tokens import token_files, token_required
from bulkrunner.errors import ConfigError
from bulkrunner.server.httpserver import make_server
from bulkrunner.server.preflight import file_mode_warnings, raise_file_limit
from bulkrunner.server.serverlog import setup_logging

log = logging.getLogger("bulkrunner")


def run_server(cfg: Config, *, log_level: str = "info", log_format: str = "text") -> NoReturn:
    """Serve until stopped, then exit the process (0 after a clean stop).

    Raises:
        ConfigError: the server cannot start (the CLI prints it and exits 2).
    """
    listener = setup_logging(log_level, log_format)
    try:
        code = _serve(cfg, log_level)
    finally:
        listener.stop()  # writes out every queued log line
    sys.stdout.flush()
    sys.stderr.flush()
    # Task threads cannot be killed and the interpreter would wait for them at exit; their
    # items are already back in the queue, so leave now.
    os._exit(code)


def _serve(cfg: Config, log_level: str) -> int:
    if not cfg.server.is_loopback and not token_required(cfg.server):
        raise ConfigError(
            f"refusing to serve on {cfg.server.host} without a token: anyone who can reach "
            "it could run tasks. Set server.token (or token_file) or [[server.tokens]] in "
            "the config, or "
            "$BULKRUNNER_TOKEN, or serve on 127.0.0.1", file=cfg.source, key="server.token")

    from bulkrunner.server import gil, memory
    from bulkrunner.server.app import create_app
    from bulkrunner.server.service import Service

    memory.limit_arenas()  # before the request and item threads start (see memory)
    gil.enable()  # short turns while big submissions are checked (see gil)
    for token_file in token_files(cfg.server):
        for warning in file_mode_warnings(token_file=token_file):
            log.warning("%s", warning)
    svc = Service(cfg)
    try:
        app = create_app(cfg, service=svc)
    except Exception:
        svc.close(grace=0)
        raise
    for warning in file_mode_warnings(database=cfg.store.path):
        log.warning("%s", warning)
    fd_warning = raise_file_limit(cfg.server.connection_limit)
    if fd_warning:
        log.warning("%s", fd_warning)
    try:
        server = make_server(app, cfg.server)
    except OSError as e:
        svc.close(grace=0)
        raise ConfigError(f"cannot listen on {cfg.server.host}:{cfg.server.port} "
                          f"({e.strerror}); pick another --port or stop what uses it",
                          file=cfg.source, key="server.port") from None
    port = server.effective_port  # type: ignore[union-attr]
    host = cfg.server.host if ":" not in cfg.server.host else f"[{cfg.server.host}]"
    # Logged at WARNING when the log is quieter than INFO: tools read the URL from this line.
    log.log(max(logging.INFO, logging.getLevelName(log_level.upper())),
            "bulkrunner serving on http://%s:%s (executor %s, %d workers, database %s)",
            host, port, cfg.executor.type, cfg.executor.max_workers,
            os.path.abspath(cfg.store.path))

    stopping = threading.Event()
    drained = threading.Event()

    def drain() -> None:
        svc.dispatcher.drain(cfg.server.shutdown_grace)
        drained.set()
        _thread.interrupt_main()  # stops server.run() in the main thread...
        # ...once it runs Python again: wake its poll(), which would otherwise sleep out
        # its one-second timeout first, so the exit comes right after the grace period.
        server.pull_trigger()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            raise SystemExit(0)  # second signal: stop now
        stopping.set()
        log.info("received %s: draining (up to %g s for running items); signal again to "
                 "stop at once", signal.Signals(signum).name, cfg.server.shutdown_grace)
        svc.begin_drain()
        threading.Thread(target=drain, name="bulkrunner-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.close()
        if not drained.is_set():
            svc.begin_drain()
            svc.dispatcher.drain(0)
        svc.close(grace=0)  # gives the dispatcher lease up too: a standby takes over
        log.info("bulkrunner stopped")
    return 0
