"""The same bulks on every executor: thread, process, a local Dask cluster (and an external
one), each through a real ``bulkrunner serve``, items per second in one table.

For each executor a fresh server (its own temp dir and database, a free loopback port) gets:

- 2,000 no-op items (``bench.tasks:noop_i``): the per-item overhead of the executor;
- 200 items of 50 ms CPU-bound work (``spin``, below: 50 ms of the item thread's own CPU
  time): how well the executor uses the cores. The ideal is cores / 0.05 s.

Items per second are counted from the 202 to the job's ``finished_at`` (the server's clock,
so polling adds no error). "start s" is from launching ``bulkrunner serve`` to ``/healthz``
answering 200 (for Dask: the local cluster's workers are up). Before the timed bulks each
server runs a few items of each task, so pool start-up and first imports are not counted.

The "dask, external" row starts ``dask scheduler`` and ``--dask-workers`` one-thread
``dask worker`` processes and sets ``max_workers`` higher than their thread count: items
then wait on the scheduler instead of in SQLite, which hides Dask's per-item round trip.

Usage: ``python bench/executors.py [--workers 2] [--noop 2000] [--cpu 200] [--rounds 1]
[--no-external]``. $BENCH_KEEP=1 keeps the temp dirs (server and Dask logs).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

try:  # imported as bench.executors: by the servers' workers (for spin), or from the root
    from bench.benchutil import (
        ROOT,
        Server,
        http_json,
        loadavg,
        print_table,
        remove_workdir,
        spread,
    )
except ImportError:  # run as a script: bench/ is on sys.path, the repository root is not
    from benchutil import (  # type: ignore[no-redef,import-not-found]
        ROOT,
        Server,
        http_json,
        loadavg,
        print_table,
        remove_workdir,
        spread,
    )

CPU_SECONDS = 0.05
TASKS = {"noop_i": "bench.tasks:noop_i", "spin": "bench.executors:spin"}


def spin(i: int = 0) -> int:
    """Burn 50 ms of this thread's CPU time (a CPU-bound item that holds the GIL)."""
    end = time.thread_time() + CPU_SECONDS
    n = 0
    while time.thread_time() < end:
        n += 1
    return i


@dataclass
class Setup:
    """One executor configuration to benchmark."""

    label: str
    executor: str
    max_workers: int
    address: str = ""
    external_workers: int = 0   # dask worker processes to start for an external cluster


@dataclass
class Result:
    setup: Setup
    start_s: float = 0.0
    noop_per_s: list[float] = field(default_factory=list)
    cpu_per_s: list[float] = field(default_factory=list)
    workers_seen: int = 0
    failures: list[str] = field(default_factory=list)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def write_config(workdir: Path, s: Setup) -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", "threads = 8", "shutdown_grace = 5",
             "[executor]", f'type = "{s.executor}"', f"max_workers = {s.max_workers}",
             f'address = "{s.address}"', "[store]", 'path = "bench.db"', "[jobs]", "[tasks]"]
    lines += [f'{name} = "{target}"' for name, target in TASKS.items()]
    path = workdir / "bulkrunner.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, last = http_json("GET", url + "/healthz", timeout=5)
            if status == 200:
                return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url}/healthz not 200 within {timeout} s: {last}")


def run_bulk(url: str, task: str, n: int, timeout: float) -> tuple[float, dict[str, object]]:
    """Submit one job of ``n`` items; return (items per second, the finished job)."""
    body = {"task": task, "items": [{"i": i} for i in range(n)]}
    t_sent = time.time()
    status, job = http_json("POST", url + "/api/v1/jobs", body, timeout=120)
    if status != 202:
        raise RuntimeError(f"submission answered {status}: {str(job)[:300]}")
    t_202 = time.time()
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.1)
        _, job = http_json("GET", f"{url}/api/v1/jobs/{job['id']}")
        if job["finished_at"] is not None:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{task} x {n} not finished after {timeout} s: {job['items']}")
    # Items counted from the 202, but never before the request was sent.
    elapsed = _ts(job["finished_at"]) - max(t_202, t_sent)
    return n / elapsed, job


class ExternalDask:
    """``dask scheduler`` and one-thread ``dask worker`` processes on loopback."""

    def __init__(self, workdir: Path, n_workers: int) -> None:
        self.workdir = workdir
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}  # workers import bench.*
        self.procs: list[subprocess.Popen[bytes]] = []
        sched = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--dashboard-address", "127.0.0.1:0"])
        self.address = self._await(sched, r"Scheduler at:\s+(tcp://\S+)")
        for i in range(n_workers):
            w = self._spawn(f"worker{i}", [
                "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                "--dashboard-address", "127.0.0.1:0", "--local-directory", str(workdir)])
            self._await(w, r"(Registered to)")

    def _spawn(self, name: str, args: list[str]) -> Path:
        path = self.workdir / f"dask-{name}.log"
        with open(path, "wb") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", *args], cwd=self.workdir, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        return path

    def _await(self, log: Path, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, log.read_text(errors="replace"))
            if m:
                return m.group(1)
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a dask process exited:\n{log.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"{log.name}: no {pattern!r} within {timeout} s")

    def stop(self) -> None:
        for p in reversed(self.procs):  # workers first, then the scheduler
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def bench_one(s: Setup, args: argparse.Namespace) -> Result:
    res = Result(s)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-exec-{s.executor}-"))
    server: Server | None = None
    cluster: ExternalDask | None = None
    try:
        if s.external_workers:
            cluster = ExternalDask(workdir, s.external_workers)
            s.address = cluster.address
        cfg = write_config(workdir, s)
        t0 = time.monotonic()
        server = Server("bulkrunner", [sys.executable, "-m", "bulkrunner", "--config",
                                       str(cfg), "serve", "--log-level", "info"],
                        workdir).start(timeout=120)
        wait_healthy(server.url, 120)
        res.start_s = time.monotonic() - t0
        for task in TASKS:  # warm-up: pools started, modules imported on every worker
            run_bulk(server.url, task, 4 * s.max_workers, 120)
        for _ in range(args.rounds):
            for task, n, out in (("noop_i", args.noop, res.noop_per_s),
                                 ("spin", args.cpu, res.cpu_per_s)):
                rate, job = run_bulk(server.url, task, n, args.timeout)
                out.append(rate)
                if job["state"] != "succeeded":
                    res.failures.append(f"{task}: {job['state']} {job['items']}")
                _, items = http_json("GET", f"{server.url}/api/v1/jobs/{job['id']}/items"
                                            "?limit=10000")
                res.workers_seen = max(res.workers_seen,
                                       len({it["worker"] for it in items["items"]}))
        print(f"{s.label}: start {res.start_s:.1f} s, no-op {spread(res.noop_per_s)}/s, "
              f"50 ms CPU {spread(res.cpu_per_s, '{:.1f}')}/s, {res.workers_seen} workers "
              f"seen (load {loadavg()})", flush=True)
    finally:
        if server is not None:
            server.stop(timeout=30)
        if cluster is not None:
            cluster.stop()
        remove_workdir(workdir)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="max_workers of every executor (default: the CPU count)")
    ap.add_argument("--noop", type=int, default=2000, help="no-op items per bulk")
    ap.add_argument("--cpu", type=int, default=200, help="50 ms CPU items per bulk")
    ap.add_argument("--rounds", type=int, default=1, help="bulks of each kind per server")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per bulk at most")
    ap.add_argument("--dask-workers", type=int, default=os.cpu_count() or 2,
                    help="worker processes of the external Dask cluster")
    ap.add_argument("--no-external", action="store_true",
                    help="skip the external Dask cluster row")
    args = ap.parse_args()
    w = args.workers
    setups = [Setup("thread", "thread", w), Setup("process", "process", w)]
    if importlib.util.find_spec("distributed") is None:
        print('Dask rows skipped: pip install "bulkrunner[dask]"', file=sys.stderr)
    else:
        setups.append(Setup("dask, local cluster", "dask", w))
        if not args.no_external:
            setups.append(Setup("dask, external", "dask", 4 * args.dask_workers,
                                external_workers=args.dask_workers))
    t_start = time.monotonic()
    print(f"{os.cpu_count()} CPUs; load average before: {loadavg()}", flush=True)
    results = [bench_one(s, args) for s in setups]

    print()
    print(f"bench/executors.py: {args.noop:,} no-op items and {args.cpu} items of "
          f"{CPU_SECONDS * 1000:.0f} ms CPU per bulk, one server per executor; "
          f"median (min-max) over {args.rounds} round(s)")
    ideal = (os.cpu_count() or 1) / CPU_SECONDS
    rows = []
    for r in results:
        s = r.setup
        pool = (f"{s.external_workers} worker processes x 1 thread" if s.external_workers
                else f"{s.max_workers} {'threads' if s.executor == 'thread' else 'processes'}")
        rows.append([s.label, pool, str(s.max_workers), f"{r.start_s:.1f}",
                     spread(r.noop_per_s), spread(r.cpu_per_s, "{:.1f}"),
                     str(r.workers_seen)])
    print_table(["executor", "pool", "max_workers", "start s", "no-op items/s",
                 "50 ms CPU items/s", "workers seen"], rows)
    print(f"(ideal for the CPU-bound bulk on {os.cpu_count()} CPUs: {ideal:.0f} items/s)")
    for r in results:
        for f in r.failures:
            print(f"FAILED {r.setup.label}: {f}")
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_start:.0f} s")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
