"""Slow clients cannot hold the server: every request has a read deadline.

waitress's own idle timeout restarts at every byte, so sockets trickling one byte at a time
used to keep every connection slot (``server.connection_limit``) for ever. The waitress
server of ``bulkrunner serve`` (``httpserver.make_server``) closes a connection whose request's
headers are not in within ``READ_TIMEOUT`` seconds, or whose body comes slower than
``MIN_BODY_RATE``; at the connection limit the deadline is ``FULL_READ_TIMEOUT`` and idle
kept-alive connections go too. Most tests run that server in this process with deadlines
of a second or less and a tiny WSGI app; the last one attacks a real ``bulkrunner serve``.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.config import ServerConfig
from bulkrunner.server import httpserver
from tests.conftest import ServerProcess, child_env, toml_config, wait_for

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    out = json.dumps({"got": len(body)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]


@contextmanager
def running(connection_limit: int = 10, read_timeout: float = 1.0,
            full_read_timeout: float = 1.0,
            min_body_rate: float = 1000.0) -> Iterator[tuple[Any, int]]:
    """``httpserver.make_server`` on a free loopback port, its loop on a thread; (server, port)."""
    from waitress import wasyncore

    cfg = ServerConfig(host="127.0.0.1", port=0, threads=2,
                       connection_limit=connection_limit)
    server = httpserver.make_server(wsgi_app, cfg, read_timeout=read_timeout,
                             full_read_timeout=full_read_timeout,
                             min_body_rate=min_body_rate)
    stop = threading.Event()

    def loop() -> None:  # server.run(), stoppable
        while not stop.is_set():
            wasyncore.loop(timeout=0.05, map=server._map, use_poll=True, count=1)

    thread = threading.Thread(target=loop, name="test-waitress", daemon=True)
    thread.start()
    try:
        yield server, server.effective_port
    finally:
        stop.set()
        thread.join(10)
        for obj in list(server._map.values()):
            obj.close()
        server.task_dispatcher.shutdown()


class Trickler:
    """Sockets that each send ``payload`` one byte every ``interval`` seconds, never the
    end of it, on a thread; what the server answered each of them before closing."""

    def __init__(self, port: int, count: int, payload: bytes = HEAD,
                 interval: float = 0.2) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5)
                      for _ in range(count)]
        self.payload = payload
        self.interval = interval
        self.answers: dict[int, bytes] = {}  # index -> what came before the server closed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trickler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sent = 0
        while not self.stop.is_set():
            for i, s in enumerate(self.socks):
                if i in self.answers:
                    continue
                readable, _, _ = select.select([s], [], [], 0)
                if readable:
                    self.answers[i] = self._drain(s)
                    continue
                try:
                    s.send(self.payload[sent % len(self.payload):][:1])
                except OSError:
                    self.answers[i] = b""
            sent += 1
            self.stop.wait(self.interval)

    @staticmethod
    def _drain(s: socket.socket) -> bytes:
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


def get(port: int, timeout: float, path: str = "/healthz") -> tuple[int, float]:
    """One GET on a fresh connection: (status, seconds it took)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - start
    finally:
        conn.close()


def test_without_a_deadline_trickling_sockets_lock_everyone_out() -> None:
    """The attack itself, against a server with no deadline: the client gets nothing."""
    never = float("inf")
    with running(connection_limit=10, read_timeout=never, full_read_timeout=never) as (
            server, port):
        t = Trickler(port, 10)
        try:
            wait_for(lambda: server.in_connection_overflow, 10, "the connection limit")
            with pytest.raises(TimeoutError):
                get(port, timeout=3)
        finally:
            t.close()


def test_trickling_sockets_are_closed_at_the_deadline_and_a_client_gets_in() -> None:
    with running(connection_limit=10, read_timeout=1.0) as (server, port):
        t = Trickler(port, 10)
        try:
            wait_for(lambda: server.in_connection_overflow, 10, "the connection limit")
            status, took = get(port, timeout=10)
            assert status == 200
            assert took < 5, took  # 1 s of deadline, 1 s between sweeps, then at once
            answered = wait_for(lambda: [a for a in t.answers.values() if a], 10,
                                "a 408 for a slow socket")
        finally:
            t.close()
    head, _, body = answered[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "within 1 s" in err["message"]


def test_at_the_limit_slow_sockets_make_room_within_the_shorter_deadline() -> None:
    """No normal deadline at all, 0.5 s while full: 30 slow sockets for 8 slots (the limit
    counts waitress's listening socket and trigger) go in waves, one a sweep, and the
    client, behind 22 of them in the queue to be accepted, waits about three sweeps."""
    with running(connection_limit=10, read_timeout=float("inf"),
                 full_read_timeout=0.5) as (server, port):
        t = Trickler(port, 30)
        try:
            wait_for(lambda: server.in_connection_overflow, 10, "the connection limit")
            status, took = get(port, timeout=15)
            assert status == 200
            assert took < 8, took
        finally:
            t.close()
    assert len(t.answers) >= 8, t.answers  # a first wave, at least, was closed


def test_at_the_limit_idle_kept_alive_connections_make_room() -> None:
    never = float("inf")
    with running(connection_limit=6, read_timeout=never, full_read_timeout=0.5) as (
            server, port):
        idle = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(4)]
        try:
            for conn in idle:  # one request each, then they stay open, idle
                conn.request("GET", "/x")
                assert conn.getresponse().read() == b'{"got": 0}'
            wait_for(lambda: server.in_connection_overflow, 10, "the connection limit")
            status, took = get(port, timeout=10)
            assert status == 200 and took < 5, took
            assert idle[0].sock is not None and idle[0].sock.recv(10) == b""  # closed
        finally:
            for conn in idle:
                conn.close()


def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    with running(read_timeout=1.0) as (_, port), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        assert s.recv(100) == b""  # closed, no 408 for a request that never began
        assert time.monotonic() - start < 5


def test_a_trickled_body_is_cut_at_its_deadline() -> None:
    head = (b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with running(read_timeout=1.0, min_body_rate=1000.0) as (_, port), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        start = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - start < 10:
            try:
                s.send(b"x")
            except OSError:
                break
            if select.select([s], [], [], 0.2)[0]:
                answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - start < 5


def test_a_body_at_a_good_rate_outlives_the_header_deadline() -> None:
    """6,000 bytes at about 4,000 bytes/s: longer than the 1 s deadline, faster than the
    1,000 bytes/s minimum, so every byte of it counts and it is served."""
    size = 6000
    head = (b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size)
    with running(read_timeout=1.0, min_body_rate=1000.0) as (_, port), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        pace = threading.Event()
        start = time.monotonic()
        for _ in range(size // 500):
            s.sendall(b"x" * 500)
            pace.wait(0.125)  # the client's own pace, not a wait for the server
        assert time.monotonic() - start > 1.2  # past the header deadline
        answer = b""
        while b'"got"' not in answer:
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"got": size}


def test_the_requests_waitress_refuses_are_still_answered_in_json() -> None:
    with running() as (_, port), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 400 Bad Request" in head.split(b"\r\n")[0] and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_request"


def test_the_clock_stops_once_a_request_is_in() -> None:
    """A kept-alive connection between two requests is idle: waitress's idle timeout, not
    the read deadline, applies to it."""
    with running(read_timeout=1.0) as (server, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/x")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read()) == {"got": 0}
            channels = list(server.active_channels.values())
            assert channels and all(c.read_started is None for c in channels)
            conn.request("GET", "/x")  # the same connection, still open
            assert conn.getresponse().status == 200
        finally:
            conn.close()


def test_a_real_server_under_slowloris_still_answers(tmp_path: Path) -> None:
    """``bulkrunner serve`` with ``connection_limit = 20``, 20 sockets trickling a header
    (more than fit: waitress counts its listening socket and its trigger): a normal
    client waits about one deadline of a full server, and the log says why."""
    cfg = toml_config(tmp_path, server="connection_limit = 20")
    with ServerProcess(cfg) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        t = Trickler(port, 20, interval=0.5)
        try:
            wait_for(lambda: "reached the connection limit" in srv.log(), 15,
                     "the connection limit")
            status, took = get(port, timeout=httpserver.READ_TIMEOUT + 15)
            assert status == 200
            assert took < httpserver.FULL_READ_TIMEOUT + 4, took
            wait_for(lambda: "did not send a whole request in time" in srv.log(), 10,
                     "the log line about closed connections")
        finally:
            t.close()


def test_the_file_limit_is_raised_to_what_the_connection_limit_needs() -> None:
    """In a child process (a lowered hard limit cannot be raised again)."""
    code = """if True:
        import resource, sys
        from bulkrunner.server.preflight import FD_HEADROOM, raise_file_limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
        assert raise_file_limit(500) is None
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 500 + FD_HEADROOM
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
        print(raise_file_limit(1000))
    """
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("server.connection_limit is 1000 but this process may open "
                                 "only 300 files (ulimit -n)"), out.stdout
