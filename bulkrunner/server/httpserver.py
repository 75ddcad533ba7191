"""The HTTP server under the app: waitress, with read deadlines and its own errors in JSON.

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

import json
import logging
import time
from typing import Any

from bulkrunner.config import ServerConfig
from bulkrunner.errors import error_body

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
#: At most one log line about connections closed at their deadline per this many seconds.
_CLOSED_LOG_EVERY = 60.0


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


__all__ = ["FULL_READ_TIMEOUT", "MIN_BODY_RATE", "READ_TIMEOUT", "make_server"]
