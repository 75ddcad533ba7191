"""Short items next to long ones on the same executor: are the short ones still batched?

A shared service runs many tasks at once: here a job of long items (0.2 s sleeps, many
more of them than there are workers, so they end all the time) and a bulk of no-op items
of another task, submitted at the same moment to one ``bulkrunner serve``. The no-op
bulk's items per second are measured from its 202 to its ``finished_at``, and set beside
the same bulk on the same server with nothing else running. Each round runs alone, then
mixed.

Items of a task are batched by that task's own run times, and claims count each item at
its task's share of a worker, so the no-op items keep their batches on the workers the
long items leave free; with one average per executor, the long items' run times turned
their batching off.

For reference, the same two workloads on a plain ``concurrent.futures`` pool of as many
workers (the library alone, in this process): the long items go first, the no-op items
after them in the pool's one queue, as the fire-and-forget pattern would run them.

Usage: ``python bench/mixed.py [--quick] [--executor thread|process] [--workers 4]
[--noop 20000] [--long 200] [--long-seconds 0.2] [--rounds 2]``. $BENCH_SRC benchmarks
another checkout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: the tasks are imported as bench.*
    sys.path.insert(0, str(_ROOT))

from bench.benchutil import (  # noqa: E402
    bulkrunner_config,
    bulkrunner_server,
    http_json,
    loadavg,
    print_table,
    remove_workdir,
    spread,
    timestamp,
    wait_finished,
)
from bench.tasks import nap, noop_i  # noqa: E402

TASKS = {"noop": "bench.tasks:noop_i", "nap": "bench.tasks:nap"}


def _submit(url: str, task: str, n: int, params: dict[str, Any] | None = None
            ) -> tuple[str, float]:
    body: dict[str, Any] = {"task": task, "items": [{"i": i} for i in range(n)]}
    if params:
        body["params"] = params
    t0 = time.time()
    status, job = http_json("POST", url + "/api/v1/jobs", body, timeout=120)
    if status != 202:
        raise RuntimeError(f"submission answered {status}: {job}")
    return job["id"], t0


def _noop_rate(url: str, n: int, timeout: float) -> float:
    ident, t0 = _submit(url, "noop", n)
    job = wait_finished(url, ident, timeout)
    if job["state"] != "succeeded":
        raise RuntimeError(f"the no-op bulk ended {job['state']}")
    return n / (timestamp(job["finished_at"]) - t0)


def library(kind: str, workers: int, n: int, n_long: int, long_s: float
            ) -> tuple[float, float]:
    """The no-op items per second on a plain pool, alone and behind the long items."""
    pool_cls = ThreadPoolExecutor if kind == "thread" else ProcessPoolExecutor
    with pool_cls(workers) as pool:
        wait([pool.submit(noop_i, i) for i in range(workers * 4)])  # workers started
        t0 = time.perf_counter()
        wait([pool.submit(noop_i, i) for i in range(n)])
        alone = n / (time.perf_counter() - t0)
        longs = [pool.submit(nap, long_s, i) for i in range(n_long)]
        t0 = time.perf_counter()
        wait([pool.submit(noop_i, i) for i in range(n)])
        mixed = n / (time.perf_counter() - t0)
        wait(longs)
    return alone, mixed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", choices=["thread", "process"], default="thread")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--noop", type=int, default=20_000, help="no-op items in the bulk")
    ap.add_argument("--long", type=int, default=200, help="items in the long job")
    ap.add_argument("--long-seconds", type=float, default=0.2, help="seconds a long item takes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes")
    args = ap.parse_args()
    if args.quick:
        args.noop, args.long, args.rounds = 2000, 20, 1
    print(f"2 CPUs; load average before: {loadavg()}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    cfg = bulkrunner_config(workdir, max_workers=args.workers, tasks=TASKS)
    text = cfg.read_text().replace('type = "thread"', f'type = "{args.executor}"')
    cfg.write_text(text)
    server = bulkrunner_server(workdir, cfg).start(timeout=120)
    alone: list[float] = []
    mixed: list[float] = []
    try:
        _noop_rate(server.url, 2000, args.timeout)  # warm-up: pools up, items measured
        wait_finished(server.url, _submit(server.url, "nap", args.workers,
                                      {"seconds": 0.2})[0], args.timeout)
        for r in range(args.rounds):
            alone.append(_noop_rate(server.url, args.noop, args.timeout))
            long_id, _ = _submit(server.url, "nap", args.long, {"seconds": args.long_seconds})
            mixed.append(_noop_rate(server.url, args.noop, args.timeout))
            wait_finished(server.url, long_id, args.timeout)
            print(f"round {r + 1}: no-op alone {alone[-1]:,.0f}/s, next to the long job "
                  f"{mixed[-1]:,.0f}/s", flush=True)
    finally:
        server.stop()
        remove_workdir(workdir)
    lib_alone, lib_mixed = library(args.executor, args.workers, args.noop, args.long,
                                   args.long_seconds)
    print()
    print(f"bench/mixed.py: {args.executor} executor, max_workers {args.workers}; "
          f"{args.noop:,} no-op items alone, then next to a job of {args.long} x "
          f"{args.long_seconds:g} s items; median (min-max) over {args.rounds} round(s)")
    ratio = statistics.median(m / a for m, a in zip(mixed, alone, strict=True))
    print_table(["who", "no-op alone, items/s", "no-op next to long items, items/s",
                 "mixed / alone"],
                [["bulkrunner", spread(alone), spread(mixed), f"{ratio:.2f}"],
                 [f"{args.executor} pool alone (FIFO: no-op items behind the long ones)",
                  f"{lib_alone:,.0f}", f"{lib_mixed:,.0f}", f"{lib_mixed / lib_alone:.2f}"]])
    print(f"load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
