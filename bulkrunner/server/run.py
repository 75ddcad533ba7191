"""Run the app under waitress, with a clean stop on SIGTERM and Ctrl-C.

waitress installs no SIGTERM handler, so SIGTERM would kill it outright. Here the first
SIGTERM or Ctrl-C starts a drain: ``/healthz`` and new submissions answer 503, running items
get ``server.shutdown_grace`` seconds, then the server stops and exits 0; what did not finish
is re-queued and runs after the next start. A second signal stops at once.

Slow clients: waitress's own idle timeout restarts at every byte, so a client sending one
byte every few seconds would hold a connection for ever, and ``server.connection_limit`` of
them would lock everyone else out (slowloris). Here each request has a read deadline:
its headers must arrive within ``READ_TIMEOUT`` seconds of its first byte (of the
connection's opening, for a connection's first request), and its body at ``MIN_BODY_RATE``
bytes a second or faster after that; a connection past its deadline is closed (with a 408
when part of a request came). While the server is at its connection limit, the deadline
is ``FULL_READ_TIMEOUT`` and kept-alive connections idle that long are closed too: the
slowest connections make room for the ones waiting to be accepted, so an attacker who
opens more sockets than the limit (and reopens those closed) delays a client by seconds
rather than locking it out. That bounds what slow sockets can do, not a flood of fast
ones: an exposed server belongs behind a reverse proxy (see README, Security).
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import queue
import signal
import stat
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from types import FrameType
from typing import Any, NoReturn

import bulkrunner.runtime.capture as capture
from bulkrunner.config import Config, ServerConfig
from bulkrunner.config.tokens import token_files, token_required
from bulkrunner.errors import ConfigError, error_body
from bulkrunner.models import iso

log = logging.getLogger("bulkrunner")

#: Seconds a request has, from its first byte (from the connection's opening, for the first
#: request of a connection), to deliver its headers.
READ_TIMEOUT = 10.0
#: Then each this many bytes of its body move its deadline one second later: a body must
#: come at this average rate (bytes per second) or faster. 32 MiB need 17 minutes at most.
MIN_BODY_RATE = 32 * 1024
#: While the server is at ``server.connection_limit``: the read deadline (seconds), and how
#: long a kept-alive connection may stay idle, so that waiting connections get in.
FULL_READ_TIMEOUT = 2.0
#: Seconds an idle kept-alive connection (between two requests) stays open.
IDLE_TIMEOUT = 15
#: Seconds between two sweeps of the connections (how late a deadline may be enforced).
SWEEP_INTERVAL = 1
#: Files the process needs besides its connections (database, logs, pipes, item files).
FD_HEADROOM = 256
#: At most one log line about connections closed at their deadline per this many seconds.
_CLOSED_LOG_EVERY = 60.0


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


class _InProcessQueueHandler(QueueHandler):
    """A QueueHandler for a listener in the same process: records go as they are.

    The stock ``prepare`` formats every record on the logging thread so it can be pickled,
    and the listener's handler formats it again; for one job line per submission that
    first formatting was the largest cost of the request after the commit. Records with
    an exception are still prepared (their traceback is rendered while it exists).
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record itself, unless it carries an exception."""
        if record.exc_info or record.stack_info:
            prepared: logging.LogRecord = super().prepare(record)
            return prepared
        return record


class _BatchingListener(QueueListener):
    """A QueueListener that writes what came in the last few milliseconds together.

    Waking the writer thread for every record (one per submission) costs two hand-offs of
    the GIL per request under load; gathering records for ``_LOG_GATHER`` seconds after
    the first one costs a log line that much delay and saves those hand-offs.
    """

    def __init__(self, q: queue.SimpleQueue[Any], handler: logging.Handler) -> None:
        super().__init__(q, handler)
        self._records = q

    def _monitor(self) -> None:
        q = self._records
        while True:
            record = self.dequeue(True)
            done = record is None  # stop() puts None, the end of the queue
            batch = [] if done else [record]
            if not done:
                time.sleep(_LOG_GATHER)  # let the next records arrive
                while True:
                    try:
                        record = q.get_nowait()
                    except queue.Empty:
                        break
                    if record is None:
                        done = True
                        break
                    batch.append(record)
            for r in batch:
                self.handle(r)
            if done:
                return


_LOG_GATHER = 0.02


def setup_logging(level: str = "info", fmt: str = "text") -> QueueListener:
    """Lines on stderr, plain or JSON (``fmt="json"``); waitress's queue-depth warnings
    are rate-limited away. A task's own log records go to its item's log, not here.

    Records are written by a listener thread, so a slow or unread stderr delays log lines,
    never a request or a commit. Stop the returned listener to flush it.
    """
    handler = logging.StreamHandler(capture.real_stream(sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter(capture.LOG_FORMAT))
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    queued = _InProcessQueueHandler(records)
    queued.addFilter(capture.outside_items)  # decided on the thread that logs
    queued.setLevel(level.upper())
    listener = _BatchingListener(records, handler)
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


def make_server(app: Any, server_cfg: ServerConfig, *, read_timeout: float = READ_TIMEOUT,
                full_read_timeout: float = FULL_READ_TIMEOUT,
                min_body_rate: float = MIN_BODY_RATE) -> Any:
    """A waitress server for ``app`` on ``server_cfg``'s host and port (not yet running:
    call ``run()``), with read deadlines on every request and its own errors in JSON.

    Raises:
        OSError: it cannot listen there.
    """
    from waitress import create_server

    server = create_server(
        app, host=server_cfg.host, port=server_cfg.port, threads=server_cfg.threads,
        connection_limit=server_cfg.connection_limit,
        max_request_body_size=server_cfg.max_body_size, ident="bulkrunner",
        channel_timeout=IDLE_TIMEOUT, cleanup_interval=SWEEP_INTERVAL,
        # poll(), not select(): select() fails on file descriptors past 1023, which a
        # connection limit in the thousands reaches.
        asyncore_use_poll=True,
        # waitress deletes X-Forwarded-* headers it was not told to trust. Behind
        # server.trusted_proxies they pass through untouched, for werkzeug's ProxyFix to read
        # (it trusts only that many hops; waitress's own trusted_proxy would trust any peer
        # or one address, and rewrite the headers a second time); without a proxy they stay
        # deleted, so nothing in the app can read a forged one.
        clear_untrusted_proxy_headers=server_cfg.trusted_proxies == 0)
    timeouts = (read_timeout, min(read_timeout, full_read_timeout))
    channel_class = _channel_class(server_cfg.max_body_size, timeouts, min_body_rate)
    server.channel_class = channel_class  # read when each connection is accepted
    _enforce_read_deadlines(server, channel_class, timeouts, min_body_rate)
    # Each sweep that makes room flips waitress's "reached the connection limit" warning
    # and its "listening again": under an attack, two lines a second.
    logging.getLogger("waitress").addFilter(_quiet_limit_flapping)
    return server


class _OncePerMinute(logging.Filter):
    """Let each of waitress's connection-limit lines ("reached the connection limit",
    "listening again") through at most once a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a connection-limit line that was logged in the last minute."""
        message = record.getMessage()
        if not message.startswith("total open connections"):
            return True
        if record.created - self.last.get(message, -1e9) < 60.0:
            return False
        self.last[message] = record.created
        return True


_quiet_limit_flapping = _OncePerMinute()


def _channel_class(max_body_size: int, timeouts: tuple[float, float],
                   min_body_rate: float) -> type:
    """waitress's connection with two changes: the requests it refuses itself (a body past
    ``server.max_body_size``, headers too large, malformed HTTP) are answered with the
    API's JSON error body (its own answer is plain text, and such requests never reach
    the app); and each request has a read deadline (:func:`_enforce_read_deadlines`)."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    messages = {
        400: ("invalid_request", "the request is not valid HTTP"),
        413: ("body_too_large", f"the request body is larger than server.max_body_size "
                                f"({max_body_size} bytes)"),
        431: ("headers_too_large", "the request headers are too large"),
        501: ("not_implemented", "the server does not implement this part of HTTP"),
    }
    read_timeout, full_read_timeout = timeouts
    timeout_body = json.dumps(error_body(
        "request_timeout", f"the request did not arrive in time: its headers must come "
        f"within {read_timeout:g} s ({full_read_timeout:g} s while the server is at its "
        f"connection limit) and its body at {min_body_rate:g} bytes/s or faster")).encode()
    timeout_answer = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                      % (len(timeout_body), timeout_body))

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
        """All on waitress's loop thread: ``received`` is called from its ``handle_read``,
        ``overdue`` from its maintenance sweep."""

        error_task_class = JsonErrorTask
        will_close: bool  # waitress's: close the connection once written

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # When the clock of the request being read started (None: none is, the
            # connection is idle between requests and waitress's idle timeout applies);
            # a new connection's first request is timed from its opening.
            self.read_started: float | None = time.monotonic()
            self.body_bytes = 0  # of that request's body received so far

        def received(self, data: bytes) -> bool:
            before = self.request  # the request half-read until now, if any
            in_body = before is not None and before.headers_finished
            result: bool = super().received(data)
            if self.request is None:  # every request in data is complete
                self.read_started = None
                self.body_bytes = 0
            elif self.request is not before:  # a new request started in data
                if before is not None or self.read_started is None:
                    self.read_started = time.monotonic()
                self.body_bytes = 0
            elif in_body:
                self.body_bytes += len(data)
            return result

        def overdue(self, now: float, wall: float, full: bool) -> bool:
            """Close the connection when the request being read is past its deadline
            (``now``: monotonic), or, when the server is ``full``, when it has been idle
            since its last answer for ``full_read_timeout`` (``wall``: waitress's
            ``time.time()`` clock). A 408 when part of a request came, else silently."""
            if self.will_close or self.close_when_flushed:
                return False
            if self.requests:  # busy answering: the next request's clock waits
                if self.read_started is not None:
                    self.read_started = now
                return False
            if self.read_started is None:  # idle between two requests
                if not full or self.total_outbufs_len or (
                        wall - self.last_activity <= full_read_timeout):
                    return False
            else:
                allowed = full_read_timeout if full else read_timeout
                if now - self.read_started <= allowed + self.body_bytes / min_body_rate:
                    return False
            if self.request is not None:
                with self.outbuf_lock:
                    self.outbufs[-1].append(timeout_answer)
                    self.current_outbuf_count += len(timeout_answer)
                    self.total_outbufs_len += len(timeout_answer)
            self.will_close = True  # its handle_write sends what it can, then closes
            return True

    return JsonErrorChannel


def _enforce_read_deadlines(server: Any, channel_class: Any, timeouts: tuple[float, float],
                            min_body_rate: float) -> None:
    """Check every connection's read deadline in waitress's maintenance sweep, which its
    loop runs every ``cleanup_interval`` seconds (it closes idle connections there), just
    before it decides whether to accept: what the sweep closes makes room at once."""
    sweep = server.maintenance
    closed = 0  # not logged yet
    logged_at = -_CLOSED_LOG_EVERY

    def maintenance(now: float) -> None:
        nonlocal closed, logged_at
        sweep(now)
        mono = time.monotonic()
        full = len(server._map) >= server.adj.connection_limit  # as waitress counts
        for channel in list(server.active_channels.values()):
            if isinstance(channel, channel_class) and channel.overdue(mono, now, full):
                closed += 1
        if closed and mono - logged_at >= _CLOSED_LOG_EVERY:
            log.warning("closed %d connection(s) that did not send a whole request in time "
                        "(the headers within %g s, %g s while at server.connection_limit, "
                        "the body at %g bytes/s or faster): slow or hostile clients (at "
                        "most one such line a minute)", closed, *timeouts, min_body_rate)
            closed, logged_at = 0, mono

    server.maintenance = maintenance


def file_mode_warnings(*, token_file: str = "", database: str = "") -> list[str]:
    """A sentence for each secret file that other users on this machine may read or change:
    the token file, and the database with its ``-wal`` and ``-shm`` files (the params,
    results and logs of every job). Files that do not exist are not checked.

    The store creates a new database 0600 (its -wal and -shm take its mode); an older one,
    or one whose mode was changed, keeps its mode: it may be shared on purpose, so it is
    named here rather than changed.
    """
    out = []
    if token_file:
        exposed = _exposure(token_file)
        if exposed:
            said, readable = exposed
            harm = ("read the token and use the server as you" if readable
                    else "replace the token")
            out.append(f"the token file {token_file} {said}, so they can {harm}; fix: "
                       f"chmod 600 {token_file}")
    if database and database != ":memory:":
        found = [(f, e) for f in (database, f"{database}-wal", f"{database}-shm")
                 if (e := _exposure(f))]
        if found:
            (first, (said, _)), rest = found[0], [f[len(database):] for f, _ in found[1:]]
            also = (f" (its {' and '.join(rest)} file{'s' if len(rest) > 1 else ''} too)"
                    if rest else "")
            harm = ("read the params, results and logs of every job"
                    if any(readable for _, (_, readable) in found) else "change the jobs")
            out.append(f"the database file {first} {said}{also}, so they can {harm}; fix: "
                       f"chmod 600 {' '.join(f for f, _ in found)}")
    return out


def _exposure(path: str) -> tuple[str, bool] | None:
    """How other users may get at ``path`` ("has mode 0640: its group can read it") and
    whether they can read it; None when only its owner can (or it does not exist)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    def can(shift: int) -> str:
        return " and ".join(c for c, bit in (("read", 4), ("change", 2)) if mode >> shift & bit)

    group, others = can(3), can(0)
    if not group and not others:  # no one else, or execute bits only
        return None
    if group == others:
        said = f"its group and everyone can {group} it"
    else:
        said = " and ".join(f"{who} can {what} it" for who, what in
                            (("its group", group), ("everyone", others)) if what)
    return f"has mode {mode:04o}: {said}", bool(mode & 0o044)


def raise_file_limit(connection_limit: int) -> str | None:
    """Raise this process's open-file limit (``ulimit -n``) to what ``connection_limit``
    connections need, as far as the hard limit allows; a warning when it stays too low."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    need = connection_limit + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new >= need:
        return None
    return (f"server.connection_limit is {connection_limit} but this process may open only "
            f"{new} files (ulimit -n); past about {max(new - FD_HEADROOM, 0)} connections "
            f"accepting fails: raise the limit to {need} or more (ulimit -n, LimitNOFILE= "
            "in a systemd unit) or lower server.connection_limit")


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
