"""Slowloris: can a normal client still reach a server that many slow sockets hold open?

A real ``bulkrunner serve`` (thread executor, its own temp dir and database) on a free
loopback port. ``--sockets`` sockets (default 500) each send the start of a request header
that never ends, one byte every ``--interval`` seconds (default 5, well under waitress's
idle timeout, which restarts at every byte); a socket the server closes is opened again at
once, as an attacker would. Meanwhile a normal client, one fresh connection per request,
sends ``GET /healthz`` then ``POST /api/v1/jobs`` (an ``echo`` job) over and over, each
with a ``--probe-timeout``, for ``--seconds`` (default 40). Then everything stops.

Printed: every probe (when it started, what it got, how long it took), the share answered
and their latency (a probe the end of the run cuts short of its timeout is not counted),
and how many slow sockets the server closed (and when it first did).

Loopback only, bounded in sockets and time. The file-descriptor limit of this process (and
so of the server it starts) is raised to what ``--sockets`` needs when the hard limit
allows it.

Usage: ``python bench/slowloris.py [--sockets 500] [--interval 5] [--seconds 40]
[--probe-timeout 15] [--connection-limit N]`` (default: the config's default).
$BENCH_SRC=/path/to/checkout attacks another copy of bulkrunner; $BENCH_KEEP=1 keeps the
temp dir (server log, database).
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from benchutil import Server, bulkrunner_config, bulkrunner_server, loadavg, remove_workdir

#: What each slow socket sends, one byte at a time: a request line and headers that never
#: end (no blank line), never more than a few hundred bytes within the bench's time.
PREFIX = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
PAD = b"X-Slow: aaaaaaaaaaaaaaaa\r\n"


def trickle_byte(n: int) -> bytes:
    """The n-th byte a slow socket sends."""
    if n < len(PREFIX):
        return PREFIX[n:n + 1]
    k = (n - len(PREFIX)) % len(PAD)
    return PAD[k:k + 1]


@dataclass
class Slot:
    sock: socket.socket
    sent: int = 0


@dataclass
class Attack:
    """``count`` slow sockets against ``host:port``, run by one thread until ``stop``."""

    host: str
    port: int
    count: int
    interval: float
    stop: threading.Event = field(default_factory=threading.Event)
    opened: int = 0
    connect_failures: int = 0
    closed_by_server: int = 0
    answered_by_server: int = 0   # closed with an answer (a 408) rather than silently
    first_close: float | None = None
    started: float = 0.0
    open_now: int = 0

    def _open(self, sel: selectors.BaseSelector, heap: list[tuple[float, int, Slot]],
              live: set[int], first_send: float) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((self.host, self.port))
        except OSError:
            s.close()
            self.connect_failures += 1
            return False
        s.setblocking(False)
        slot = Slot(s)
        sel.register(s, selectors.EVENT_READ, slot)
        self.opened += 1
        live.add(id(slot))
        heapq.heappush(heap, (first_send, id(slot), slot))
        return True

    def run(self, ready: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        heap: list[tuple[float, int, Slot]] = []
        live: set[int] = set()
        self.started = time.monotonic()
        for i in range(self.count):  # first bytes spread over one interval
            self._open(sel, heap, live, self.started + self.interval * i / self.count)
        ready.set()
        while not self.stop.is_set():
            now = time.monotonic()
            wait = min(0.5, max(0.0, heap[0][0] - now)) if heap else 0.5
            for key, _ in sel.select(wait):
                slot: Slot = key.data
                try:
                    data = slot.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                self._closed(slot, data, sel, live)
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, ident, slot = heapq.heappop(heap)
                if ident not in live:
                    continue
                try:
                    slot.sock.send(trickle_byte(slot.sent))
                    slot.sent += 1
                    heapq.heappush(heap, (now + self.interval, ident, slot))
                except (BlockingIOError, InterruptedError):
                    heapq.heappush(heap, (now + self.interval, ident, slot))
                except OSError:
                    self._closed(slot, b"", sel, live)
            while len(live) < self.count and not self.stop.is_set():  # the attacker is back
                if not self._open(sel, heap, live, time.monotonic()):
                    break
            self.open_now = len(live)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()

    def _closed(self, slot: Slot, data: bytes, sel: selectors.BaseSelector,
                live: set[int]) -> None:
        if id(slot) not in live:
            return
        live.discard(id(slot))
        sel.unregister(slot.sock)
        slot.sock.close()
        self.closed_by_server += 1
        if data:
            self.answered_by_server += 1
        if self.first_close is None:
            self.first_close = time.monotonic() - self.started


@dataclass
class Probe:
    what: str
    at: float          # seconds since the attack started
    outcome: str       # "200", "202", "timeout", "reset", ...
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome in ("200", "202")


def probe(url: str, method: str, path: str, body: bytes | None, timeout: float,
          t0: float) -> Probe:
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None
    start = time.monotonic()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        resp.read()
        outcome = str(resp.status)
    except TimeoutError:
        outcome = "timeout"
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        outcome = type(e).__name__
    finally:
        conn.close()
    return Probe(f"{method} {path}", start - t0, outcome, time.monotonic() - start)


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return int(soft)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=500)
    ap.add_argument("--interval", type=float, default=5.0,
                    help="seconds between two bytes of one slow socket")
    ap.add_argument("--seconds", type=float, default=40.0, help="how long the attack lasts")
    ap.add_argument("--probe-timeout", type=float, default=15.0)
    ap.add_argument("--connection-limit", type=int, default=0,
                    help="server.connection_limit (0: the config's default)")
    args = ap.parse_args()
    if not 1 <= args.sockets <= 5000 or not 1 <= args.seconds <= 300:
        ap.error("--sockets must be 1..5000 and --seconds 1..300")
    limit = raise_fd_limit(2 * args.sockets + 256)
    if limit < args.sockets + 64:
        print(f"the file limit is {limit}, too low for {args.sockets} sockets", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="bench-slowloris-"))
    server: Server | None = None
    try:
        config = bulkrunner_config(workdir)
        if args.connection_limit:
            text = config.read_text().replace(
                "[server]\n", f"[server]\nconnection_limit = {args.connection_limit}\n", 1)
            config.write_text(text)
        server = bulkrunner_server(workdir, config).start()
        job = json.dumps({"task": "echo", "params": {"msg": "hi"}}).encode()
        calm = [probe(server.url, "GET", "/healthz", None, 5, time.monotonic()),
                probe(server.url, "POST", "/api/v1/jobs", job, 5, time.monotonic())]
        u = urllib.parse.urlsplit(server.url)
        assert u.hostname is not None and u.port is not None
        attack = Attack(u.hostname, u.port, args.sockets, args.interval)
        ready = threading.Event()
        thread = threading.Thread(target=attack.run, args=(ready,), daemon=True)
        thread.start()
        ready.wait(60)
        t0 = attack.started
        end = t0 + args.seconds
        probes: list[Probe] = []
        time.sleep(1.0)  # let the server accept what it will
        while time.monotonic() < end - 0.5:
            for method, path, body in (("GET", "/healthz", None),
                                       ("POST", "/api/v1/jobs", job)):
                left = end - time.monotonic()
                if left < 0.5:
                    break
                p = probe(server.url, method, path, body, min(args.probe_timeout, left), t0)
                if p.outcome == "timeout" and left < args.probe_timeout:
                    p.outcome = "cut"  # by the end of the run, before its own timeout
                probes.append(p)
                print(f"  +{p.at:5.1f} s  {p.what:<18} {p.outcome:<8} {p.seconds:6.3f} s",
                      flush=True)
            time.sleep(1.0)
        attack.stop.set()
        thread.join(30)
        log = server.log()
    finally:
        if server is not None:
            server.stop()
        remove_workdir(workdir)

    print()
    print(f"bench/slowloris.py: {args.sockets} slow sockets (one byte every "
          f"{args.interval:g} s, reopened when closed) for {args.seconds:g} s; "
          f"server.connection_limit {args.connection_limit or 'default'}; "
          f"probe timeout {args.probe_timeout:g} s; load {loadavg()}")
    print("before the attack: " + ", ".join(f"{p.what} {p.outcome} in {p.seconds:.3f} s"
                                              for p in calm))
    cut = sum(p.outcome == "cut" for p in probes)
    for what in ("GET /healthz", "POST /api/v1/jobs"):
        ps = [p for p in probes if p.what == what and p.outcome != "cut"]
        ok = [p for p in ps if p.ok]
        secs = [p.seconds for p in ok]
        lat = (f"median {statistics.median(secs):.3f} s, max {max(secs):.3f} s" if ok
               else "-")
        first = f"first answer at +{ok[0].at + ok[0].seconds:.1f} s" if ok else "never answered"
        failed = sorted({p.outcome for p in ps if not p.ok})
        print(f"during: {what:<18} answered {len(ok)}/{len(ps)} ({lat}; {first})"
              + (f"; failures: {', '.join(failed)}" if failed else ""))
    if cut:
        print(f"({cut} probe(s) cut short by the end of the run, not counted)")
    first_close = ("never" if attack.first_close is None
                   else f"first at +{attack.first_close:.1f} s")
    print(f"slow sockets: {attack.opened} opened, {attack.closed_by_server} closed by the "
          f"server ({attack.answered_by_server} with an answer; {first_close}), "
          f"{attack.connect_failures} connects failed, {attack.open_now} open at the end")
    print(f"server log: {log.count('reached the connection limit')} 'reached the connection "
          f"limit' warnings, {log.count('did not send a whole request')} "
          f"'did not send a whole request' lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
