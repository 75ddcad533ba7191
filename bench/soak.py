"""Soak: half an hour of mixed load at half of the measured capacity, watching for drift.

One real ``bulkrunner serve`` (thread executor, 4 workers, its own temp dir and database,
retention of a few minutes so the database reaches a steady size) gets, from
``--clients`` client processes each on a keep-alive connection, an open-loop mix of:
one-item submissions (most of them), bulks of 200 items, jobs that fail and are retried,
long items that are cancelled, bulks paused and resumed, job reads, job lists, item pages,
JSON Lines exports, /healthz and /metrics. One more process reads an export of a
5,000-item job slowly (about 15 s a read), so a read snapshot regularly keeps the
write-ahead log from being checkpointed, as a slow export client would.

First the same mix runs flat out for ``--probe`` seconds (closed loop): that is the
capacity; the soak then runs at half of it (or at ``--rate`` operations a second).

Half of the capacity must also be work the server keeps up with, or the soak measures a
growing backlog (a bigger database, a longer queue) and not drift: the mix's sleepers take
half a second (cancelled ones less), about a third of the four workers, and the queue depth
is sampled throughout. After the probe the backlog it left is drained before the soak.

Every ``--every`` seconds (a minute by default; a sixth of the run when it is shorter than
six minutes) it samples the server: resident memory (VmRSS), open files (/proc/PID/fd),
threads, the ``-wal`` and database file sizes, the queue depth (``/metrics``), and from
the clients the submit p50 / p99 and errors of that window. At the end: the table, start
against end (the goal is flat within 10 %), whether the queue stayed flat, and with
matplotlib (``pip install 'bulkrunner[plot]'``) a PNG of each figure over time.

Usage: ``python bench/soak.py [--minutes 30] [--rate OPS] [--clients 3] [--probe 20]
[--every 60] [--plot soak.png]``. The full run is ``python bench/soak.py`` (about 31
minutes). $BENCH_KEEP=1 keeps the temp dir (server log, database).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import queue
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchutil import (
    KeepAlive,
    Server,
    loadavg,
    print_table,
    proc_cpu_seconds,
    proc_status_kb,
    remove_workdir,
)

JOBS = "/api/v1/jobs"
#: The mix: operation and weight.
MIX = {"submit": 40, "get": 18, "list": 6, "items": 6, "health": 5, "metrics": 3,
       "bulk": 2, "export": 3, "fail": 3, "retry": 3, "sleeper": 2, "cancel": 2,
       "pause": 2}
SLEEPER_SECONDS = 0.5  # 2 % of the ops: about 1.2 of the 4 workers at 120 ops/s
SLOW_EXPORT_ITEMS = 5000
SLOW_READ = (8192, 0.025)  # bytes per read, seconds between reads
SLOW_EVERY = 20.0          # seconds between two slow exports


def config(workdir: Path) -> Path:
    text = f"""
[server]
host = "127.0.0.1"
port = 0
threads = 8
shutdown_grace = 0
[executor]
type = "thread"
max_workers = 4
[store]
path = "{workdir / 'soak.db'}"
[jobs]
retry_backoff = 0.1
[retention]
succeeded = "3m"
failed = "3m"
cancelled = "3m"
interval = "30s"
[tasks]
nap = "bench.tasks:nap"
noop_i = "bench.tasks:noop_i"
"""
    path = workdir / "bulkrunner.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- clients
@dataclass
class Recent:
    """Ids a client keeps to act on (bounded)."""

    jobs: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    bulks: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    failed: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=50))
    sleepers: deque[str] = field(default_factory=lambda: deque(maxlen=50))


class Conn:
    """A keep-alive connection that reconnects after an error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.c = KeepAlive(url, timeout=60)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        try:
            return self.c.request(method, path, data)
        except (OSError, http.client.HTTPException):
            self.c.close()
            self.c = KeepAlive(self.url, timeout=60)
            return 0, b""


def _id(status: int, data: bytes) -> str | None:
    if status in (200, 202):
        try:
            return str(json.loads(data)["id"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def do(op: str, conn: Conn, r: Recent, rng: random.Random) -> int:
    """Run one operation of the mix; returns the HTTP status (0: no answer)."""
    if op == "submit":
        st, data = conn.call("POST", JOBS, {"task": "nap", "params": {"seconds": 0.002}})
        if (i := _id(st, data)) is not None:
            r.jobs.append(i)
        return st
    if op == "bulk":
        st, data = conn.call("POST", JOBS, {"task": "noop_i",
                                            "items": [{"i": n} for n in range(200)]})
        if (i := _id(st, data)) is not None:
            r.bulks.append(i)
        return st
    if op == "fail":
        st, data = conn.call("POST", JOBS, {"task": "fail", "max_attempts": 1})
        if (i := _id(st, data)) is not None:
            r.failed.append((time.monotonic(), i))
        return st
    if op == "sleeper":
        st, data = conn.call("POST", JOBS, {"task": "sleep",
                                            "params": {"seconds": SLEEPER_SECONDS}})
        if (i := _id(st, data)) is not None:
            r.sleepers.append(i)
        return st
    if op == "retry" and r.failed and time.monotonic() - r.failed[0][0] > 1:
        return conn.call("POST", f"{JOBS}/{r.failed.popleft()[1]}/retry")[0]
    if op == "cancel" and r.sleepers:
        return conn.call("POST", f"{JOBS}/{r.sleepers.popleft()}/cancel")[0]
    if op == "pause" and r.bulks:
        job = rng.choice(r.bulks)
        st = conn.call("POST", f"{JOBS}/{job}/pause")[0]
        conn.call("POST", f"{JOBS}/{job}/resume")
        return st
    if op == "get" and r.jobs:
        return conn.call("GET", f"{JOBS}/{rng.choice(r.jobs)}")[0]
    if op == "items" and r.bulks:
        return conn.call("GET", f"{JOBS}/{rng.choice(r.bulks)}/items?limit=100")[0]
    if op == "export" and r.bulks:
        return conn.call("GET", f"{JOBS}/{rng.choice(r.bulks)}/results?format=jsonl")[0]
    if op == "health":
        return conn.call("GET", "/healthz")[0]
    if op == "metrics":
        return conn.call("GET", "/metrics")[0]
    return conn.call("GET", f"{JOBS}?limit=20")[0]  # list, and ops with nothing to act on


def client(n: int, url: str, rate: float, until: float, out: Any) -> None:
    """Run the mix until ``until`` (time.time()); ``rate`` ops/s open loop, 0 = flat out.
    Sends lists of (time, op, ms, status) to ``out`` about once a second."""
    rng = random.Random(1000 + n)
    ops, weights = list(MIX), list(MIX.values())
    conn, recent = Conn(url), Recent()
    batch: list[tuple[float, str, float, int]] = []
    sent = time.monotonic()
    next_at = time.monotonic()
    while time.time() < until:
        if rate:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1:
                next_at = time.monotonic()  # far behind: do not burst to catch up
            next_at += rng.expovariate(rate)
        op = rng.choices(ops, weights)[0]
        t0 = time.perf_counter()
        status = do(op, conn, recent, rng)
        batch.append((time.time(), op, (time.perf_counter() - t0) * 1000, status))
        if time.monotonic() - sent >= 1:
            out.put(batch)
            batch, sent = [], time.monotonic()
    out.put(batch)
    conn.c.close()


def slow_reader(url: str, until: float, out: Any) -> None:
    """Every SLOW_EVERY s, read an export of a 5,000-item job slowly (one long snapshot)."""
    conn = Conn(url)
    job = None
    while time.time() < until:
        if job is None or conn.call("GET", f"{JOBS}/{job}")[0] != 200:
            job = _id(*conn.call("POST", JOBS, {
                "task": "noop_i", "items": [{"i": n} for n in range(SLOW_EXPORT_ITEMS)]}))
            time.sleep(2)  # let it run
            continue
        t0 = time.perf_counter()
        h = KeepAlive(url, timeout=120)
        h.conn.request("GET", f"{JOBS}/{job}/results?format=jsonl")
        resp = h.conn.getresponse()
        size = 0
        while chunk := resp.read(SLOW_READ[0]):
            size += len(chunk)
            time.sleep(SLOW_READ[1])
        h.close()
        out.put([(time.time(), "slow_export", (time.perf_counter() - t0) * 1000,
                  resp.status)])
        time.sleep(max(0.0, SLOW_EVERY - (time.perf_counter() - t0)))
    conn.c.close()


def run_clients(url: str, clients: int, rate: float, seconds: float, slow: bool
                ) -> tuple[list[Any], Any]:
    until = time.time() + seconds
    out = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=client, args=(n, url, rate / clients, until, out),
                         daemon=True) for n in range(clients)]
    if slow:
        procs.append(ctx.Process(target=slow_reader, args=(url, until, out), daemon=True))
    for p in procs:
        p.start()
    return procs, out


# --------------------------------------------------------------------------- samples
@dataclass
class Sample:
    minute: float
    rss_mb: float
    fds: int
    threads: int
    wal_mb: float
    db_mb: float
    cpu: float
    ops: int
    errors: int
    submit_p50: float
    submit_p99: float
    slow_exports: int
    queued: int


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def _metrics(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def queue_depth(url: str) -> int:
    """Items waiting to run, from the server's ``/metrics`` (-1 when it does not answer)."""
    m = re.search(r"^bulkrunner_queue_depth (\S+)$", _metrics(url), re.M)
    return int(float(m.group(1))) if m else -1


def item_totals(url: str) -> tuple[int, int]:
    """(items stored that have finished, items stored not yet finished), from ``/metrics``."""
    done = left = 0
    for state, n in re.findall(r'^bulkrunner_items\{state="(\w+)",task="[^"]*"\} (\S+)$',
                               _metrics(url), re.M):
        if state in ("succeeded", "failed", "cancelled"):
            done += int(float(n))
        else:
            left += int(float(n))
    return done, left


def take(pid: int, db: Path, t0: float, window: list[tuple[float, str, float, int]],
         cpu_before: float, seconds: float, url: str) -> Sample:
    def size(p: Path) -> float:
        try:
            return p.stat().st_size / 2**20
        except FileNotFoundError:
            return 0.0

    submits = [ms for _, op, ms, st in window if op == "submit" and st == 202]
    return Sample(
        minute=(time.monotonic() - t0) / 60, rss_mb=proc_status_kb(pid, "VmRSS") / 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")), threads=proc_status_kb(pid, "Threads"),
        wal_mb=size(Path(f"{db}-wal")), db_mb=size(db),
        cpu=(proc_cpu_seconds(pid) - cpu_before) / seconds * 100, ops=len(window),
        errors=sum(1 for *_, st in window if st == 0 or st >= 500),
        submit_p50=pct(submits, 50), submit_p99=pct(submits, 99),
        slow_exports=sum(1 for _, op, _, _ in window if op == "slow_export"),
        queued=queue_depth(url))


def row(s: Sample) -> list[str]:
    return [f"{s.minute:.1f}", f"{s.rss_mb:.1f}", str(s.fds), str(s.threads),
            f"{s.wal_mb:.2f}", f"{s.db_mb:.1f}", f"{s.cpu:.0f}", str(s.ops), str(s.errors),
            f"{s.submit_p50:.2f}", f"{s.submit_p99:.2f}", str(s.slow_exports), str(s.queued)]


HEADERS = ["min", "RSS MB", "fds", "threads", "WAL MB", "db MB", "CPU %", "ops", "errors",
           "submit p50 ms", "submit p99 ms", "slow exports", "queued"]


def drain(out: Any, into: list[Any]) -> None:
    while True:
        try:
            into.extend(out.get_nowait())
        except queue.Empty:
            return


def plot(samples: list[Sample], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'bulkrunner[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [("rss_mb", "RSS (MB)"), ("fds", "open files"), ("wal_mb", "WAL (MB)"),
            ("submit_p99", "submit p99 (ms)"), ("queued", "queued items")]
    fig, axes = plt.subplots(len(figs), 1, figsize=(8, 11), sharex=True)
    minutes = [s.minute for s in samples]
    for ax, (attr, label) in zip(axes, figs, strict=True):
        ax.plot(minutes, [getattr(s, attr) for s in samples], marker="o")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="operations a second (default: half of the measured capacity)")
    ap.add_argument("--clients", type=int, default=3, help="client processes")
    ap.add_argument("--probe", type=float, default=20.0,
                    help="seconds of flat-out load to measure capacity")
    ap.add_argument("--every", type=float, default=0.0,
                    help="seconds between samples (default 60, or a sixth of a short run)")
    ap.add_argument("--plot", type=Path, default=Path("soak.png"), help="PNG to write")
    args = ap.parse_args()
    total = args.minutes * 60
    every = args.every or min(60.0, total / 6)

    workdir = Path(tempfile.mkdtemp(prefix="bulkrunner-soak-"))
    cfg = config(workdir)
    db = workdir / "soak.db"
    srv = Server("bulkrunner", [sys.executable, "-m", "bulkrunner", "--config", str(cfg),
                                "serve", "--log-level", "warning"], workdir).start()
    try:
        rate = args.rate
        if not rate:
            done0, left0 = item_totals(srv.url)
            end = time.monotonic() + args.probe
            procs, out = run_clients(srv.url, args.clients, 0.0, args.probe, slow=False)
            got: list[Any] = []
            # Read the queue while the clients run: a process that has put more than the
            # pipe holds does not exit until it is read.
            while time.monotonic() < end:
                drain(out, got)
                time.sleep(0.2)
            done1, left1 = item_totals(srv.url)
            while any(p.is_alive() for p in procs) and time.monotonic() < end + 60:
                drain(out, got)
                time.sleep(0.1)
            drain(out, got)
            # Capacity is what the server gets done, not what it accepts: flat out, the
            # requests outrun the workers, so the ops rate is scaled by the share of the
            # items it brought that were also run meanwhile.
            ran, grew = done1 - done0, max(0, left1 - left0)
            share = ran / (ran + grew) if ran + grew else 1.0
            ops = len(got) / args.probe
            rate = ops * share / 2
            print(f"capacity (closed loop, {args.clients} clients, {args.probe:g} s): "
                  f"{ops:,.0f} ops/s accepted, {ran:,} items run and {grew:,} left queued "
                  f"(share {share:.2f}): {ops * share:,.0f} ops/s; soaking at {rate:,.0f} "
                  "ops/s")
            # The probe left a backlog: drained first, so the soak starts from a steady state.
            t = time.monotonic()
            while (left := queue_depth(srv.url)) > 50 and time.monotonic() - t < 600:
                time.sleep(1)
            print(f"the probe's backlog drained in {time.monotonic() - t:.0f} s "
                  f"({left} items left)")
        print(f"soak: {args.minutes:g} min at {rate:,.0f} ops/s, {args.clients} clients, "
              f"sample every {every:g} s; load {loadavg()}; server log {srv.log_path}")
        procs, out = run_clients(srv.url, args.clients, rate, total, slow=True)
        t0 = time.monotonic()
        samples: list[Sample] = []
        print("  ".join(HEADERS))
        window: list[Any] = []
        cpu = proc_cpu_seconds(srv.pid)
        for k in range(1, int(total // every) + 1):
            end = t0 + k * every
            while time.monotonic() < end:
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))
                drain(out, window)
            s = take(srv.pid, db, t0, window, cpu, every, srv.url)
            cpu = proc_cpu_seconds(srv.pid)
            samples.append(s)
            print("  ".join(row(s)), flush=True)
            window = []
            if srv.proc is not None and srv.proc.poll() is not None:
                print(f"the server exited ({srv.proc.returncode}):\n{srv.log()[-3000:]}")
                return 1
        stop = time.monotonic() + 60
        while any(p.is_alive() for p in procs) and time.monotonic() < stop:
            drain(out, [])  # their last batches, so that they can exit
            time.sleep(0.1)
        print()
        print_table(HEADERS, [row(s) for s in samples])
        if len(samples) >= 2:
            a, b = samples[0], samples[-1]
            print("\nstart -> end (goal: flat within 10 %):")
            for attr, label in (("rss_mb", "RSS MB"), ("fds", "open files"),
                                ("wal_mb", "WAL MB"), ("submit_p99", "submit p99 ms"),
                                ("queued", "queued items")):
                x, y = getattr(a, attr), getattr(b, attr)
                change = f"{(y - x) / x * 100:+.0f} %" if x else "-"
                print(f"  {label:14} {x:8.2f} -> {y:8.2f}  ({change})")
            # A queue that grows means more work came than the server did: then the other
            # figures follow the backlog, and the rate should be lowered (--rate).
            steady = b.queued <= max(200, 2 * a.queued)
            print(f"  the load was {'sustainable' if steady else 'NOT sustainable'}: "
                  f"queue {a.queued} -> {b.queued} items (max "
                  f"{max(s.queued for s in samples)})")
            print(f"  WAL MB max     {max(s.wal_mb for s in samples):8.2f}; errors "
                  f"{sum(s.errors for s in samples)}; submit p99 median "
                  f"{statistics.median(s.submit_p99 for s in samples):.2f} ms")
        # The mix's failing jobs are each told at WARNING: the others are the news.
        warnings = [ln for ln in srv.log().splitlines()
                    if (" WARNING " in ln or " ERROR " in ln)
                    and "finished: failed" not in ln and "serving on" not in ln]
        print(f"server log: {len(warnings)} other warning/error line(s)"
              + "".join(f"\n  {ln[:200]}" for ln in warnings[:10]))
        plot(samples, args.plot, f"bulkrunner soak, {args.minutes:g} min at {rate:,.0f} "
                                 f"ops/s")
        return 0
    finally:
        srv.stop()
        remove_workdir(workdir)


if __name__ == "__main__":
    raise SystemExit(main())
