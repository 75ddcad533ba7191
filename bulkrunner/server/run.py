"""Run the app under waitress, with a clean stop on SIGTERM and Ctrl-C.

waitress installs no SIGTERM handler, so SIGTERM would kill it outright. Here the first
SIGTERM or Ctrl-C starts a drain: ``/healthz`` and new submissions answer 503, running items
get ``server.shutdown_grace`` seconds, then the server stops and exits 0; what did not finish
is re-queued and runs after the next start. A second signal stops at once.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import queue
import signal
import sys
import threading
from logging.handlers import QueueHandler, QueueListener
from types import FrameType
from typing import Any, NoReturn

import bulkrunner.runtime.capture as capture
from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, error_body
from bulkrunner.models import iso

log = logging.getLogger("bulkrunner")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and job_id when the line is
    about a job (``extra={"job_id": ...}``), exc with the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {"ts": iso(record.created), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            out["job_id"] = job_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted already by the QueueHandler
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> QueueListener:
    """Lines on stderr, plain or JSON (``fmt="json"``); waitress's queue-depth warnings
    are rate-limited away. A task's own log records go to its item's log, not here.

    Records are written by a listener thread, so a slow or unread stderr delays log lines,
    never a request or a commit. Stop the returned listener to flush it.
    """
    handler = logging.StreamHandler(capture.real_stream(sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter(capture.LOG_FORMAT))
    queued = QueueHandler(queue.SimpleQueue())
    queued.addFilter(capture.outside_items)  # decided on the thread that logs
    queued.setLevel(level.upper())
    listener = QueueListener(queued.queue, handler)
    listener.start()
    root = logging.getLogger()
    root.handlers[:] = [queued]
    handler.setLevel(queued.level)
    # The root level gates what tasks log too: let INFO through to their item logs even
    # when the server's own log is quieter (the handler's level filters that).
    root.setLevel(min(logging.INFO, handler.level))
    logging.captureWarnings(True)
    # Under load it writes thousands of lines a second; an unread stderr then blocks us.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return listener


def _answer_errors_in_json(server: Any, max_body_size: int) -> None:
    """Make waitress answer the requests it refuses itself (a body past
    ``server.max_body_size``, headers too large, malformed HTTP) with the contract's JSON
    error body. Its own answer is plain text, and such requests never reach the app."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    messages = {
        400: ("invalid_request", "the request is not valid HTTP"),
        413: ("body_too_large", f"the request body is larger than server.max_body_size "
                                f"({max_body_size} bytes)"),
        431: ("headers_too_large", "the request headers are too large"),
        501: ("not_implemented", "the server does not implement this part of HTTP"),
    }

    class JsonErrorTask(ErrorTask):  # type: ignore[misc]
        def execute(self) -> None:
            err = self.request.error
            code, message = messages.get(err.code, ("internal_error", "the server failed on "
                                                    "this request"))
            if err.code in (400, 501) and err.body:
                message = f"{message}: {err.body}"
            body = json.dumps(error_body(code, message)).encode()
            self.status = f"{err.code} {err.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):  # type: ignore[misc]
        error_task_class = JsonErrorTask

    server.channel_class = JsonErrorChannel  # read when each connection is accepted


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
    if not cfg.server.is_loopback and not cfg.server.token:
        raise ConfigError(
            f"refusing to serve on {cfg.server.host} without a token: anyone who can reach "
            "it could run tasks. Set server.token (or token_file) in the config, or "
            "$BULKRUNNER_TOKEN, or serve on 127.0.0.1", file=cfg.source, key="server.token")

    from waitress import create_server

    from bulkrunner.server.app import create_app
    from bulkrunner.server.service import Service

    svc = Service(cfg)
    try:
        app = create_app(cfg, service=svc)
    except Exception:
        svc.close(grace=0)
        raise
    try:
        server = create_server(
            app, host=cfg.server.host, port=cfg.server.port, threads=cfg.server.threads,
            connection_limit=cfg.server.connection_limit,
            max_request_body_size=cfg.server.max_body_size, ident="bulkrunner",
            channel_timeout=60, cleanup_interval=15)
    except OSError as e:
        svc.close(grace=0)
        raise ConfigError(f"cannot listen on {cfg.server.host}:{cfg.server.port} "
                          f"({e.strerror}); pick another --port or stop what uses it",
                          file=cfg.source, key="server.port") from None
    _answer_errors_in_json(server, cfg.server.max_body_size)
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
        # ...once it runs Python again: wake its select(), which would otherwise sleep out
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
        svc.pruner.stop()
        svc.store.close()
        log.info("bulkrunner stopped")
    return 0
