"""Ten million items stored and queued: do reads, claims, exports and memory care?

One ``bulkrunner serve`` (thread executor, its own temp dir and database, a free loopback
port) with two tasks on the same no-op function: ``held``, paused for the whole run so its
items stay queued, and ``go``, which runs.

1. With 1,000 ``held`` items stored: the p99 of ``GET`` a job, a page of 100 items, the job
   list and ``/metrics`` (sequential requests on one keep-alive connection), and the drain
   rate of one ``go`` job of ``--drain`` items (from its 202 to its ``finished_at``).
2. ``--jobs`` bulks of ``--per-job`` ``held`` items are submitted one after another, while
   another connection submits one-item ``go`` jobs back to back: the p99 of those that
   overlapped a bulk's request (the writer writes big bulks in slices, so a small job waits
   for one slice, not for a whole bulk).
3. With everything stored: the same reads and the same drain, then the export of the
   drained job as JSON Lines and CSV (rows a second, read to the end).
4. ``held`` resumed: claims straight from the big queue, items a second for a few seconds.

The server's RSS (VmRSS): fresh, warm (after step 1: pools started, first bulks served),
and its peak from then on (sampled twice a second), its growth over the run. At the end,
the database's size (with its WAL) per item stored.

Usage: ``python bench/scale.py [--quick] [--jobs 100] [--per-job 100000] [--drain 100000]
[--requests 500]``. The full run stores 10,000,000 items (about 1.5 GB of database in the
temp dir) and takes several minutes; ``--quick`` stores 100,000 in 10 jobs. $BENCH_KEEP=1
keeps the temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.benchutil import (  # noqa: E402
    KeepAlive,
    bulkrunner_config,
    bulkrunner_server,
    http_json,
    loadavg,
    print_table,
    proc_status_kb,
    remove_workdir,
    timestamp,
    wait_finished,
)

TASKS = {"held": "bench.tasks:noop_i", "go": "bench.tasks:noop_i"}
JOBS = "/api/v1/jobs"
LIST_PAGE = 20


def p99(values: list[float]) -> float:
    """The 99th percentile, in milliseconds."""
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[98] * 1000


def items_body(task: str, n: int) -> bytes:
    return json.dumps({"task": task, "items": [{"i": i} for i in range(n)]}).encode()


class Rss:
    """The server's VmRSS: when it started, and sampled each second from :meth:`mark` on."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fresh = self.now()
        self.start = self.peak = self.fresh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def mark(self) -> None:
        """The run's start: the server is warm (pools up, first requests served)."""
        self.start = self.peak = self.now()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak = max(self.peak, self.now())
            except (OSError, KeyError):
                return

    def stop(self) -> tuple[float, float, float, float]:
        """(fresh, start, peak, end) in MB."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        end = self.now()
        return self.fresh, self.start, max(self.peak, end), end


def newest_singles(url: str, n: int = LIST_PAGE) -> None:
    """Submit ``n`` one-item ``go`` jobs and wait for them: the job list then shows the same
    page (``n`` finished one-item jobs) whatever else is stored, so its two reads compare
    like with like."""
    ids = []
    for i in range(n):
        status, job = http_json("POST", url + JOBS, {"task": "go", "params": {"i": i}})
        if status != 202:
            raise RuntimeError(f"a one-item job answered {status}")
        ids.append(job["id"])
    for ident in ids:
        wait_finished(url, ident, 60)


def reads(url: str, job_id: str, n: int) -> dict[str, float]:
    """p99 ms of each read, ``n`` sequential requests each on one keep-alive connection.
    The job list is of the newest :data:`LIST_PAGE` jobs, :func:`newest_singles`."""
    newest_singles(url)
    ka = KeepAlive(url)
    out: dict[str, float] = {}
    try:
        for name, path in (("job", f"{JOBS}/{job_id}"),
                           ("items page", f"{JOBS}/{job_id}/items?limit=100"),
                           ("job list", f"{JOBS}?limit={LIST_PAGE}"),
                           ("/metrics", "/metrics")):
            for _ in range(max(1, n // 5)):  # warm: caches, and the page's first reads
                ka.request("GET", path)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _ = ka.request("GET", path)
                times.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"GET {path} answered {status}")
            out[name] = p99(times)
    finally:
        ka.close()
    return out


def drain(url: str, n: int, timeout: float) -> tuple[float, str]:
    """Items per second of one ``go`` job of ``n`` items, and its id."""
    body = items_body("go", n)
    t0 = time.time()
    status, job = http_json("POST", url + JOBS, body, timeout=300)
    if status != 202:
        raise RuntimeError(f"the drain job answered {status}: {str(job)[:300]}")
    t_202 = time.time()
    job = wait_finished(url, job["id"], timeout)
    if job["state"] != "succeeded":
        raise RuntimeError(f"the drain job ended {job['state']}: {job['items']}")
    return n / (timestamp(job["finished_at"]) - max(t0, t_202)), job["id"]


def export(url: str, job_id: str, fmt: str) -> tuple[float, int]:
    """Rows a second of one export read to the end, and the rows."""
    ka = KeepAlive(url, timeout=300)
    try:
        t0 = time.perf_counter()
        status, data = ka.request("GET", f"{JOBS}/{job_id}/results?format={fmt}")
        dt = time.perf_counter() - t0
    finally:
        ka.close()
    if status != 200:
        raise RuntimeError(f"export {fmt} answered {status}")
    rows = data.count(b"\n") - (1 if fmt == "csv" else 0)  # the CSV header
    return rows / dt, rows


def load(url: str, jobs: int, per_job: int) -> tuple[float, list[float], list[str]]:
    """Submit the held bulks while one-item jobs are submitted alongside. Returns the
    seconds the bulks took, the latencies of the one-item submissions that overlapped a
    bulk's request, and the bulks' ids."""
    body = items_body("held", per_job)
    spans: list[tuple[float, float]] = []
    ids: list[str] = []
    done = threading.Event()
    small: list[tuple[float, float]] = []  # (start, latency)

    def singles() -> None:
        ka = KeepAlive(url)
        one = json.dumps({"task": "go", "params": {"i": 0}}).encode()
        try:
            while not done.is_set():
                t0 = time.perf_counter()
                status, _ = ka.request("POST", JOBS, one)
                small.append((t0, time.perf_counter() - t0))
                if status != 202:
                    raise RuntimeError(f"a one-item submission answered {status}")
                time.sleep(0.005)
        finally:
            ka.close()

    side = threading.Thread(target=singles, daemon=True)
    side.start()
    ka = KeepAlive(url, timeout=600)
    t_start = time.perf_counter()
    try:
        for k in range(jobs):
            t0 = time.perf_counter()
            status, data = ka.request("POST", JOBS, body)
            spans.append((t0, time.perf_counter()))
            if status != 202:
                raise RuntimeError(f"bulk {k} answered {status}: {data[:300]!r}")
            ids.append(json.loads(data)["id"])
            if (k + 1) % 10 == 0:
                print(f"  {k + 1} of {jobs} bulks stored ({(k + 1) * per_job:,} items, "
                      f"{time.perf_counter() - t_start:.0f} s)", flush=True)
    finally:
        took = time.perf_counter() - t_start
        done.set()
        side.join(30)
        ka.close()
    overlapping = [lat for t0, lat in small
                   if any(a <= t0 + lat and t0 <= b for a, b in spans)]
    return took, overlapping, ids


def held_claim_rate(url: str, seconds: float) -> float:
    """Resume ``held`` and count its items finishing for ``seconds``: claims straight from
    the big queue (its succeeded count, from ``/metrics``)."""
    pattern = re.compile(r'^bulkrunner_items\{(?=[^}]*task="held")(?=[^}]*state="succeeded")'
                         r'[^}]*\} (\S+)$', re.M)

    def succeeded() -> float:
        ka = KeepAlive(url)
        try:
            _, text = ka.request("GET", "/metrics")
        finally:
            ka.close()
        m = pattern.search(text.decode())
        return float(m.group(1)) if m else 0.0

    http_json("POST", f"{url}/api/v1/tasks/held/resume")
    time.sleep(0.5)  # the first claims
    t0, n0 = time.monotonic(), succeeded()
    time.sleep(seconds)
    n1 = succeeded()
    rate = (n1 - n0) / (time.monotonic() - t0)
    http_json("POST", f"{url}/api/v1/tasks/held/pause")
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100, help="held bulks to store")
    ap.add_argument("--per-job", type=int, default=100_000, help="items per held bulk")
    ap.add_argument("--drain", type=int, default=100_000, help="items of the drain job")
    ap.add_argument("--requests", type=int, default=500, help="requests per read measured")
    ap.add_argument("--workers", type=int, default=4, help="max_workers (thread executor)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 100,000 items in 10 jobs, a 10,000-item drain")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.per_job, args.drain, args.requests = 10, 10_000, 10_000, 100
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    total = args.jobs * args.per_job
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cfg = bulkrunner_config(workdir, max_workers=args.workers, tasks=TASKS,
                            jobs=f"max_queued = {total * 2 + 1_000_000}\n"
                                 f"max_items = {max(args.per_job, args.drain)}")
    server = bulkrunner_server(workdir, cfg)
    print(f"{os.cpu_count()} CPUs; load average before: {loadavg()}; {total:,} items in "
          f"{args.jobs} jobs", flush=True)
    t_run = time.monotonic()
    try:
        server.start(timeout=60)
        url = server.url
        rss = Rss(server.pid)
        status, _ = http_json("POST", f"{url}/api/v1/tasks/held/pause")
        if status != 200:
            raise RuntimeError(f"pausing the held task answered {status}")
        drain(url, 2000, 120)  # warm-up: the executor measured short items
        status, small = http_json("POST", url + JOBS, items_body("held", 1000))
        if status != 202:
            raise RuntimeError(f"the 1,000 held items answered {status}")
        base = reads(url, small["id"], args.requests)
        base_drain, _ = drain(url, args.drain, 600)
        rss.mark()
        print(f"with 1,000 stored: {base}; drain {base_drain:,.0f} items/s (RSS "
              f"{proc_status_kb(server.pid, 'VmRSS') / 1024:.0f} MB)", flush=True)

        took, singles, ids = load(url, args.jobs, args.per_job)
        print(f"stored {total:,} items in {took:.0f} s ({total / took:,.0f} items/s); "
              f"{len(singles)} one-item submissions overlapped a bulk (RSS "
              f"{proc_status_kb(server.pid, 'VmRSS') / 1024:.0f} MB)", flush=True)

        big = reads(url, ids[len(ids) // 2], args.requests)
        big_drain, drained = drain(url, args.drain, 600)
        jsonl, rows_j = export(url, drained, "jsonl")
        csv, rows_c = export(url, drained, "csv")
        print(f"with {total:,} stored: {big}; drain {big_drain:,.0f} items/s; export "
              f"{jsonl:,.0f} / {csv:,.0f} rows/s (RSS "
              f"{proc_status_kb(server.pid, 'VmRSS') / 1024:.0f} MB)", flush=True)
        claims = held_claim_rate(url, 3 if args.quick else 10)
        fresh_mb, start_mb, peak_mb, end_mb = rss.stop()
        db = workdir / "bench.db"
        size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
        stored = total + 1000 + 2 * args.drain + 2000 + len(singles) + 2 * LIST_PAGE
    finally:
        server.stop(timeout=60)
        remove_workdir(workdir)

    print()
    print(f"bench/scale.py: {total:,} held items in {args.jobs} jobs of {args.per_job:,} "
          f"(a paused task), thread executor with {args.workers} workers, "
          f"{args.requests} sequential requests per read")
    rows = []
    for name in ("job", "items page", "job list", "/metrics"):
        rows.append([f"{name} p99 ms", f"{base[name]:.2f}", f"{big[name]:.2f}",
                     f"{big[name] / base[name]:.2f}", "<= 1.5x"])
    rows.append([f"drain of a {args.drain:,}-item job, items/s", f"{base_drain:,.0f}",
                 f"{big_drain:,.0f}", f"{big_drain / base_drain:.2f}", ">= 0.9x"])
    rows.append(["claims from the held queue itself, items/s", "-", f"{claims:,.0f}", "-",
                 ""])
    rows.append([f"export JSON Lines ({rows_j:,} rows), rows/s", "-", f"{jsonl:,.0f}", "-",
                 ">= 100,000"])
    rows.append([f"export CSV ({rows_c:,} rows), rows/s", "-", f"{csv:,.0f}", "-",
                 ">= 100,000"])
    rows.append(["one-item submission during bulks, p99 ms", "-",
                 f"{p99(singles):.1f} (n={len(singles)}, p50 "
                 f"{statistics.median(singles or [0]) * 1000:.1f}, max "
                 f"{max(singles, default=0) * 1000:.0f})", "-", "< 50"])
    rows.append(["server RSS MB: fresh, warm, peak, end", f"{fresh_mb:.0f}, {start_mb:.0f}",
                 f"{peak_mb:.0f}, {end_mb:.0f} (growth {peak_mb - start_mb:.0f} from warm)",
                 "-", "growth < 25"])
    rows.append(["database bytes per item", "-", f"{size / stored:,.0f} ({size / 1e6:,.0f} MB)",
                 "-", ""])
    rows.append(["storing the bulks, items/s", "-", f"{total / took:,.0f}", "-", ""])
    print_table(["measure", "1,000 stored", f"{total:,} stored", "ratio", "target"], rows)
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_run:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
