"""Webhooks: how long a delivery takes after its job ends, and a burst of jobs finishing at
once, with the drain rate with and without webhooks side by side.

A receiver (``http.server``, HTTP/1.1 keep-alive, answers 200 at once) runs in this
process on a free loopback port and notes when each POST arrives. Each run starts a fresh
``bulkrunner serve`` (thread executor, its own temp dir and database) whose ``[notify]
allowed`` is the receiver.

- latency: ``--latency-jobs`` single-item jobs of ``noop_i``, one after the other, each with
  a ``notify_url``: from the job's ``finished_at`` (the server's clock; same machine) to the
  POST's arrival. Median, p95 and max.
- burst: the task is paused, ``--burst`` single-item jobs are submitted, the task is
  resumed, and all of them finish as fast as the dispatcher drains them. Drain rate: jobs
  from the resume to the last ``finished_at``. Run twice, without webhooks and with one per
  job; with them, also when the last POST arrived, and that every job was delivered exactly
  once (a duplicate would be a receiver's to drop, but none is expected here).

Usage: ``python bench/notify.py [--latency-jobs 100] [--burst 1000] [--rounds 1]``;
``--quick`` for a smoke run (10 and 100). $BENCH_KEEP=1 keeps the temp dirs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchutil import (
    KeepAlive,
    bulkrunner_config,
    bulkrunner_server,
    http_json,
    loadavg,
    print_table,
    remove_workdir,
    spread,
    timestamp,
)

TASKS = {"noop_i": "bench.tasks:noop_i"}


class Receiver:
    """Notes the arrival time (``time.time()``) of every POST, by job id."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        self.got = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                at = time.time()
                job_id = json.loads(body)["job"]["id"]
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.got:
                    receiver.arrivals.append((job_id, at))
                    receiver.got.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` POSTs have arrived; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.got:
            while len(self.arrivals) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.got.wait(left)
            return True

    def reset(self) -> None:
        with self.lock:
            self.arrivals.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _server(workdir: Path, receiver: Receiver, workers: int) -> Any:
    cfg = bulkrunner_config(workdir, max_workers=workers, tasks=TASKS)
    cfg.write_text(cfg.read_text() + f'\n[notify]\nallowed = ["{receiver.url}/"]\n'
                   'max_attempts = 8\n')
    server = bulkrunner_server(workdir, cfg).start()
    http_json("GET", server.url + "/healthz")  # first request: lazy imports, caches
    return server


def latency(receiver: Receiver, n: int, workers: int) -> list[float]:
    """Seconds from each job's finished_at to its POST's arrival, ``n`` jobs in a row."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    server = None
    out: list[float] = []
    try:
        server = _server(workdir, receiver, workers)
        client = KeepAlive(server.url)
        body = json.dumps({"task": "noop_i", "notify_url": f"{receiver.url}/hook"}).encode()
        for i in range(n):
            receiver.reset()
            status, raw = client.request("POST", "/api/v1/jobs", body)
            if status != 202:
                raise RuntimeError(f"submission answered {status}: {raw[:300]!r}")
            job_id = json.loads(raw)["id"]
            if not receiver.wait(1, 30):
                raise RuntimeError(f"job {i} ({job_id}): no POST within 30 s")
            _, raw = client.request("GET", f"/api/v1/jobs/{job_id}")
            job = json.loads(raw)
            (got_id, at), = receiver.arrivals
            assert got_id == job_id, (got_id, job_id)
            out.append(at - timestamp(job["finished_at"]))
        client.close()
        return out
    finally:
        if server is not None:
            server.stop()
        remove_workdir(workdir)


@dataclass
class Burst:
    webhooks: bool
    jobs: int
    drain_s: float
    deliver_s: float | None
    delivered: int
    duplicates: int

    @property
    def drain_per_s(self) -> float:
        return self.jobs / self.drain_s if self.drain_s else 0.0


def burst(receiver: Receiver, n: int, workers: int, webhooks: bool,
          timeout: float = 120.0) -> Burst:
    """``n`` jobs held back by a task pause, released at once; how fast they drain, and
    (``webhooks``) how soon every one of them was delivered."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    server = None
    try:
        server = _server(workdir, receiver, workers)
        receiver.reset()
        client = KeepAlive(server.url)
        status, raw = client.request("POST", "/api/v1/tasks/noop_i/pause")
        if status != 200:
            raise RuntimeError(f"pause answered {status}: {raw[:300]!r}")
        job = {"task": "noop_i", **({"notify_url": f"{receiver.url}/hook"} if webhooks
                                    else {})}
        for i in range(n):
            status, raw = client.request("POST", "/api/v1/jobs",
                                         json.dumps({**job, "params": {"i": i}}).encode())
            if status != 202:
                raise RuntimeError(f"submission {i} answered {status}: {raw[:300]!r}")
        released = time.time()
        client.request("POST", "/api/v1/tasks/noop_i/resume")
        deadline = time.monotonic() + timeout
        while _succeeded(client) < n:  # from the store's counters: cheap to ask often
            if time.monotonic() > deadline:
                raise RuntimeError(f"the burst of {n} jobs did not finish within {timeout} s")
            time.sleep(0.1)
        while True:  # the counters may run a moment ahead of the jobs' rows
            jobs = _all_jobs(client)
            if all(j["finished_at"] for j in jobs):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the burst's jobs did not all finish")
            time.sleep(0.1)
        last_finish = max(timestamp(j["finished_at"]) for j in jobs)
        deliver_s = None
        if webhooks:
            if not receiver.wait(n, timeout):
                raise RuntimeError(f"{len(receiver.arrivals)} of {n} POSTs within {timeout} s")
            deliver_s = max(at for _, at in receiver.arrivals) - released
        counts = Counter(job_id for job_id, _ in receiver.arrivals)
        client.close()
        return Burst(webhooks=webhooks, jobs=n, drain_s=last_finish - released,
                     deliver_s=deliver_s, delivered=len(counts),
                     duplicates=sum(c - 1 for c in counts.values()))
    finally:
        if server is not None:
            server.stop()
        remove_workdir(workdir)


def _succeeded(client: KeepAlive) -> int:
    """Items of noop_i stored as succeeded (the ``bulkrunner_items`` gauge)."""
    _, raw = client.request("GET", "/metrics")
    for line in raw.decode().splitlines():
        if (line.startswith("bulkrunner_items{") and 'state="succeeded"' in line
                and 'task="noop_i"' in line):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _all_jobs(client: KeepAlive) -> list[dict[str, Any]]:
    """Every job of the server, page after page."""
    jobs: list[dict[str, Any]] = []
    before = ""
    while True:
        _, raw = client.request("GET", f"/api/v1/jobs?limit=1000{before}")
        page = json.loads(raw)
        jobs += page["jobs"]
        if page["next"] is None:
            return jobs
        before = f"&before={page['next']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-jobs", type=int, default=100)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4, help="executor.max_workers")
    ap.add_argument("--rounds", type=int, default=1, help="burst runs of each kind")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 jobs, a burst of 100")
    args = ap.parse_args()
    if args.quick:
        args.latency_jobs, args.burst = 10, 100
    t_start = time.monotonic()
    print(f"load average before: {loadavg()}", flush=True)
    receiver = Receiver()
    try:
        lat = latency(receiver, args.latency_jobs, args.workers)
        print(f"latency over {len(lat)} jobs: median {1000 * statistics.median(lat):.1f} ms "
              f"(load {loadavg()})", flush=True)
        runs: list[Burst] = []
        for rnd in range(args.rounds):
            for webhooks in (False, True):
                b = burst(receiver, args.burst, args.workers, webhooks)
                runs.append(b)
                extra = (f", all {b.delivered} delivered {b.deliver_s:.2f} s after the "
                         f"release ({b.duplicates} duplicates)" if webhooks else "")
                print(f"round {rnd + 1} {'with' if webhooks else 'without'} webhooks: "
                      f"{b.jobs} jobs drained in {b.drain_s:.2f} s = {b.drain_per_s:,.0f} "
                      f"jobs/s{extra} (load {loadavg()})", flush=True)
    finally:
        receiver.close()

    print()
    lat_sorted = sorted(lat)
    p95 = lat_sorted[min(len(lat_sorted) - 1, int(0.95 * len(lat_sorted)))]
    print(f"bench/notify.py: thread executor, max_workers {args.workers}")
    print_table(["delivery latency after the job ends", "median ms", "p95 ms", "max ms"],
                [[f"{len(lat)} jobs, one at a time", f"{1000 * statistics.median(lat):.1f}",
                  f"{1000 * p95:.1f}", f"{1000 * max(lat):.1f}"]])
    print()
    rows = []
    for webhooks in (False, True):
        rs = [r for r in runs if r.webhooks is webhooks]
        rows.append(["with" if webhooks else "without", str(args.burst),
                     spread([r.drain_per_s for r in rs]),
                     spread([r.deliver_s for r in rs if r.deliver_s is not None], "{:.2f}")
                     if webhooks else "-",
                     spread([r.delivered for r in rs]) if webhooks else "-",
                     str(sum(r.duplicates for r in rs)) if webhooks else "-"])
    print_table(["webhooks", "jobs at once", "drain jobs/s", "all delivered after s",
                 "delivered", "duplicates"], rows)
    with_, without = ([r.drain_per_s for r in runs if r.webhooks is w] for w in (True, False))
    share = 100 * statistics.median(with_) / statistics.median(without)
    print(f"\ndrain rate with webhooks: {share:.0f}% of the rate without")
    ok = all(r.delivered == r.jobs for r in runs if r.webhooks)
    print(f"target: every job of every burst delivered: {'PASS' if ok else 'FAIL'}")
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
