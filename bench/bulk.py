"""One bulk of 100,000 no-op items: time to the 202, drain rate, the server's memory.

For each ``max_workers`` (default 4 and 8) a fresh ``bulkrunner serve`` (thread executor,
its own temp dir and database, free loopback port) gets one ``POST /api/v1/jobs`` with
``{"task": "noop_i", "items": [{"i": 0}, {"i": 1}, ...]}``. Measured:

- submit: from sending the request to the 202 (the body is encoded beforehand);
- drain: items per second from the 202 to the job's ``finished_at`` (the job is polled
  every 0.2 s; the server's own finish time is used, so polling adds no error);
- the ceiling: ``ThreadPoolExecutor(max_workers).map(noop_i, range(n))`` in this process,
  the same function with no HTTP, no store and no dispatcher;
- memory: the server's VmRSS before the submission, its VmHWM (peak) and VmRSS after.

Usage: ``python bench/bulk.py [--items 100000] [--workers 4,8] [--rounds 1]``. A drain
that has not finished after ``--drain-timeout`` seconds is reported from its partial count.
$BENCH_SRC=/path/to/checkout benchmarks another copy of bulkrunner; $BENCH_KEEP=1 keeps the
temp dirs (server logs, databases).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchutil import (
    bulkrunner_config,
    bulkrunner_server,
    http_json,
    loadavg,
    print_table,
    proc_cpu_seconds,
    proc_status_kb,
    remove_workdir,
    spread,
    timestamp,
)
from tasks import noop_i

TASKS = {"noop_i": "bench.tasks:noop_i"}


@dataclass
class BulkRun:
    workers: int
    submit_s: float
    drain_s: float
    done: int
    finished: bool
    state: str
    rss_before_mb: float
    hwm_mb: float
    rss_after_mb: float
    cpu_submit_s: float
    cpu_drain_s: float
    ceiling_per_s: float

    @property
    def drain_per_s(self) -> float:
        return self.done / self.drain_s if self.drain_s else 0.0


def ceiling(workers: int, n: int) -> float:
    """Items per second of raw ``ThreadPoolExecutor.map`` over ``noop_i``."""
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        for _ in pool.map(noop_i, range(n)):
            pass
        return n / (time.perf_counter() - t0)


def one_run(workers: int, n: int, drain_timeout: float) -> BulkRun:
    body = json.dumps({"task": "noop_i", "items": [{"i": i} for i in range(n)]}).encode()
    workdir = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    server = None
    try:
        cfg = bulkrunner_config(workdir, max_workers=workers, tasks=TASKS)
        server = bulkrunner_server(workdir, cfg).start()
        http_json("GET", server.url + "/healthz")  # first request: lazy imports, caches
        pid = server.pid
        rss_before = proc_status_kb(pid, "VmRSS") / 1024
        cpu0 = proc_cpu_seconds(pid)

        t_send = time.time()
        status, job = http_json("POST", server.url + "/api/v1/jobs", body, timeout=120)
        t_202 = time.time()
        cpu1 = proc_cpu_seconds(pid)
        if status != 202:
            raise RuntimeError(f"the bulk submission answered {status}: {str(job)[:500]}")

        deadline = time.monotonic() + drain_timeout
        while True:
            time.sleep(0.2)
            _, job = http_json("GET", f"{server.url}/api/v1/jobs/{job['id']}")
            if job["finished_at"] is not None or time.monotonic() > deadline:
                break
        t_end = time.time()
        cpu2 = proc_cpu_seconds(pid)
        finished = job["finished_at"] is not None
        end = timestamp(job["finished_at"]) if finished else t_end
        counts = job["items"]
        return BulkRun(workers=workers, submit_s=t_202 - t_send, drain_s=end - t_202,
                       done=counts["succeeded"] + counts["failed"], finished=finished,
                       state=job["state"], rss_before_mb=rss_before,
                       hwm_mb=proc_status_kb(pid, "VmHWM") / 1024,
                       rss_after_mb=proc_status_kb(pid, "VmRSS") / 1024,
                       cpu_submit_s=cpu1 - cpu0, cpu_drain_s=cpu2 - cpu1,
                       ceiling_per_s=0.0)
    finally:
        if server is not None:
            server.stop()
        remove_workdir(workdir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--workers", default="4,8", help="max_workers values, comma-separated")
    ap.add_argument("--rounds", type=int, default=1, help="runs per max_workers value")
    ap.add_argument("--drain-timeout", type=float, default=50.0,
                    help="seconds to wait for a drain before reporting a partial rate")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    t_start = time.monotonic()
    print(f"load average before: {loadavg()}", flush=True)

    runs: list[BulkRun] = []
    for rnd in range(args.rounds):
        for w in workers:
            run = one_run(w, args.items, args.drain_timeout)
            run.ceiling_per_s = ceiling(w, args.items)
            runs.append(run)
            print(f"round {rnd + 1} max_workers {w}: 202 after {run.submit_s:.2f} s, "
                  f"drained {run.done:,} in {run.drain_s:.1f} s = {run.drain_per_s:,.0f}/s "
                  f"({run.state}), ceiling {run.ceiling_per_s:,.0f}/s, RSS "
                  f"{run.rss_before_mb:.0f} -> peak {run.hwm_mb:.0f} -> {run.rss_after_mb:.0f}"
                  f" MB, server CPU {run.cpu_submit_s:.2f} s submit + {run.cpu_drain_s:.1f} s "
                  f"drain (load {loadavg()})", flush=True)

    print()
    print(f"bench/bulk.py: one bulk of {args.items:,} no-op items (noop_i), thread executor; "
          f"median (min-max) over {args.rounds} round(s)")
    rows = []
    for w in workers:
        rs = [r for r in runs if r.workers == w]
        rows.append([
            str(w), spread([r.submit_s for r in rs], "{:.2f}"),
            spread([r.drain_per_s for r in rs]),
            spread([r.ceiling_per_s for r in rs]),
            spread([100 * r.drain_per_s / r.ceiling_per_s for r in rs], "{:.1f}%"),
            spread([1e6 * r.cpu_drain_s / max(r.done, 1) for r in rs], "{:.0f}"),
            spread([r.rss_before_mb for r in rs]), spread([r.hwm_mb for r in rs]),
            spread([r.hwm_mb - r.rss_before_mb for r in rs]),
            "yes" if all(r.finished for r in rs) else "NO (timed out)"])
    print_table(["max_workers", "202 s", "drain items/s", "ceiling items/s", "of ceiling",
                 "server CPU us/item", "RSS before MB", "peak MB", "growth MB", "finished"],
                rows)
    print()
    ok = True
    for name, good, fig in _targets(runs):
        ok &= good
        print(f"target: {name}: {fig} {'PASS' if good else 'FAIL'}")
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_start:.0f} s")
    return 0 if all(r.finished for r in runs) else 1


def _targets(runs: list[BulkRun]) -> list[tuple[str, bool, Any]]:
    worst_submit = max(r.submit_s for r in runs)
    best_drain = max(r.drain_per_s for r in runs)
    worst_growth = max(r.hwm_mb - r.rss_before_mb for r in runs)
    return [("202 within 3 s", worst_submit < 3, f"worst {worst_submit:.2f} s"),
            ("drain >= 10,000 items/s", best_drain >= 10_000, f"best {best_drain:,.0f}/s"),
            ("RSS growth < 100 MB", worst_growth < 100, f"worst {worst_growth:.0f} MB")]


if __name__ == "__main__":
    sys.exit(main())
