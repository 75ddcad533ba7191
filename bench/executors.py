"""Every executor against its library alone, on the same items, in one table.

For each executor (threads, processes, a local Dask cluster, optionally an external Dask
cluster) a fresh ``bulkrunner serve`` (its own temp dir and database, a free loopback
port) runs three bulks, each submitted as one job:

- no-op items (``bench.tasks:noop_i``): the per-item overhead, where batching counts;
- 1 ms items (``bench.tasks:nap``, a 1 ms sleep);
- 50 ms CPU-bound items (``spin``, below: 50 ms of the item thread's own CPU time): how
  well the executor uses the cores. The ideal is cores / 0.05 s, one core for threads
  (the GIL).

Items per second are counted from the 202 to the job's ``finished_at`` (the server's
clock, after its last outcome is committed). Before the timed bulks each server runs a
short bulk of each kind, so pool start-up and first imports are not counted.

Beside it, the library alone on the same functions (the 50 ms CPU items too, every item
handed over at once), in this process: one item per call
(``ThreadPoolExecutor.map``, ``ProcessPoolExecutor.map(chunksize=1)``, Dask
``Client.map``), and in its best batched form (``chunksize`` for processes; for Dask a
list-in, list-out task of a batch), batches holding about as much work as bulkrunner's.

Usage: ``python bench/executors.py [--quick] [--workers 2] [--noop 50000] [--ms 5000]
[--cpu 200] [--rounds 1] [--external]``. ``--quick`` is a smoke run of small bulks (no
targets judged). $BENCH_KEEP=1 keeps the temp dirs (server and Dask logs).
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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: the tasks are imported as bench.*
    sys.path.insert(0, str(_ROOT))

from bench.benchutil import (  # noqa: E402
    ROOT,
    Server,
    http_json,
    loadavg,
    print_table,
    remove_workdir,
    spread,
    timestamp,
)
from bench.tasks import nap, noop_i  # noqa: E402

CPU_SECONDS = 0.05
MS = 0.001
TASKS = {"noop_i": "bench.tasks:noop_i", "nap": "bench.tasks:nap",
         "spin": "bench.executors:spin"}
#: The targets of the full run: no-op items per second through bulkrunner.
TARGETS = {"thread": 30_000, "process": 20_000, "dask": 10_000}
CPU_TARGET = 0.9  # of the ideal


def spin(i: int = 0) -> int:
    """Burn 50 ms of this thread's CPU time (a CPU-bound item that holds the GIL)."""
    end = time.thread_time() + CPU_SECONDS
    n = 0
    while time.thread_time() < end:
        n += 1
    return i


def noop_chunk(items: Sequence[int]) -> list[None]:
    """A batch of no-op items: the library's batched form for Dask."""
    return [noop_i(i) for i in items]


def nap_chunk(items: Sequence[int]) -> list[None]:
    """A batch of 1 ms items."""
    return [nap(MS, i) for i in items]


def nap_ms(i: int) -> None:
    """One 1 ms item (a module-level function, so process pools can pickle it)."""
    nap(MS, i)


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
    noop: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    lib: dict[str, float] = field(default_factory=dict)
    workers_seen: int = 0
    failures: list[str] = field(default_factory=list)


def write_config(workdir: Path, s: Setup) -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", "threads = 8", "shutdown_grace = 5",
             "[executor]", f'type = "{s.executor}"', f"max_workers = {s.max_workers}",
             f'address = "{s.address}"', "[store]", 'path = "bench.db"', "[jobs]",
             "max_items = 1000000", "[tasks]"]
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


def run_bulk(url: str, task: str, n: int, timeout: float, params: dict[str, Any] | None = None
             ) -> tuple[float, dict[str, Any]]:
    """Submit one job of ``n`` items; return (items per second, the finished job)."""
    body = {"task": task, "params": params or {}, "items": [{"i": i} for i in range(n)]}
    t_sent = time.time()
    status, job = http_json("POST", url + "/api/v1/jobs", body, timeout=300)
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
    elapsed = timestamp(job["finished_at"]) - max(t_202, t_sent)
    return n / elapsed, job


# ---------------------------------------------------------------------- the libraries
def _timed(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def library_threads(w: int, n: int, n_ms: int, n_cpu: int) -> dict[str, float]:
    with ThreadPoolExecutor(w) as pool:
        list(pool.map(noop_i, range(100)))  # threads started
        return {"noop_one": _timed(lambda: list(pool.map(noop_i, range(n))), n),
                "ms_one": _timed(lambda: list(pool.map(nap_ms, range(n_ms))), n_ms),
                "cpu_one": _timed(lambda: list(pool.map(spin, range(n_cpu))), n_cpu)}


def library_processes(w: int, n: int, n_ms: int, n_cpu: int) -> dict[str, float]:
    ctx = get_context("forkserver")
    ms_chunk = max(1, int(0.004 / MS))  # about 4 ms of work a message, as bulkrunner
    with ProcessPoolExecutor(w, mp_context=ctx) as pool:
        list(pool.map(noop_i, range(100)))  # workers started, modules imported
        return {
            "noop_one": _timed(lambda: list(pool.map(noop_i, range(n // 2))), n // 2),
            "noop_batch": _timed(lambda: list(pool.map(noop_i, range(n), chunksize=256)), n),
            "ms_one": _timed(lambda: list(pool.map(nap_ms, range(n_ms))), n_ms),
            "ms_batch": _timed(lambda: list(pool.map(nap_ms, range(n_ms),
                                                     chunksize=ms_chunk)), n_ms),
            "cpu_one": _timed(lambda: list(pool.map(spin, range(n_cpu))), n_cpu),
        }


def library_dask(w: int, n: int, n_ms: int, n_cpu: int) -> dict[str, float]:
    from distributed import Client, LocalCluster

    def batched(client: Any, fn: Callable[[Sequence[int]], object], total: int,
                size: int) -> None:
        chunks = [list(range(i, min(i + size, total))) for i in range(0, total, size)]
        client.gather(client.map(fn, chunks, pure=False))

    with LocalCluster(n_workers=w, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        client.gather(client.map(noop_i, range(100), pure=False))
        one = min(n, 3000)  # one task per item is slow: a smaller bulk tells its rate
        ms_size = max(1, int(0.01 / MS))  # about 10 ms of work a task, as bulkrunner
        return {
            "noop_one": _timed(lambda: client.gather(client.map(noop_i, range(one),
                                                                pure=False)), one),
            "noop_batch": _timed(lambda: batched(client, noop_chunk, n, 500), n),
            "ms_one": _timed(lambda: client.gather(client.map(nap_ms, range(n_ms),
                                                              pure=False)), n_ms),
            "ms_batch": _timed(lambda: batched(client, nap_chunk, n_ms, ms_size), n_ms),
            "cpu_one": _timed(lambda: client.gather(client.map(spin, range(n_cpu),
                                                               pure=False)), n_cpu),
        }


# ---------------------------------------------------------------------- external Dask
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


# ---------------------------------------------------------------------- bulkrunner
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
        # Warm-up: pools started, modules imported on every worker, item times measured.
        for task, n, params in (("noop_i", 2000, None), ("nap", 200, {"seconds": MS}),
                                ("spin", 4 * s.max_workers, None)):
            run_bulk(server.url, task, n, 120, params)
        for _ in range(args.rounds):
            for task, n, out, params in (("noop_i", args.noop, res.noop, None),
                                         ("nap", args.ms, res.ms, {"seconds": MS}),
                                         ("spin", args.cpu, res.cpu, None)):
                rate, job = run_bulk(server.url, task, n, args.timeout, params)
                out.append(rate)
                if job["state"] != "succeeded":
                    res.failures.append(f"{task}: {job['state']} {job['items']}")
                if task == "spin":
                    _, items = http_json("GET", f"{server.url}/api/v1/jobs/{job['id']}/items"
                                                "?limit=10000")
                    res.workers_seen = max(res.workers_seen,
                                           len({it["worker"] for it in items["items"]}))
        print(f"{s.label}: start {res.start_s:.1f} s, no-op {spread(res.noop)}/s, 1 ms "
              f"{spread(res.ms)}/s, 50 ms CPU {spread(res.cpu, '{:.1f}')}/s, "
              f"{res.workers_seen} workers seen (load {loadavg()})", flush=True)
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
    ap.add_argument("--noop", type=int, default=50_000, help="no-op items per bulk")
    ap.add_argument("--ms", type=int, default=5_000, help="1 ms items per bulk")
    ap.add_argument("--cpu", type=int, default=200, help="50 ms CPU items per bulk")
    ap.add_argument("--rounds", type=int, default=1, help="bulks of each kind per server")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per bulk at most")
    ap.add_argument("--external", action="store_true",
                    help="also an external Dask cluster (dask scheduler + dask worker)")
    ap.add_argument("--dask-workers", type=int, default=os.cpu_count() or 2,
                    help="worker processes of the external Dask cluster")
    ap.add_argument("--no-library", action="store_true", help="skip the libraries alone")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: small bulks, no targets judged")
    args = ap.parse_args()
    # Worker processes (the process pools', Dask's) import the tasks as bench.*.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if args.quick:
        args.noop, args.ms, args.cpu = 5_000, 500, 20
    w = args.workers
    setups = [Setup("thread", "thread", w), Setup("process", "process", w)]
    have_dask = importlib.util.find_spec("distributed") is not None
    if not have_dask:
        print('Dask rows skipped: pip install "bulkrunner[dask]"', file=sys.stderr)
    else:
        setups.append(Setup("dask, local cluster", "dask", w))
        if args.external:
            setups.append(Setup("dask, external", "dask", 4 * args.dask_workers,
                                external_workers=args.dask_workers))
    t_start = time.monotonic()
    cores = os.cpu_count() or 1
    print(f"{cores} CPUs; load average before: {loadavg()}", flush=True)
    results = [bench_one(s, args) for s in setups]
    if not args.no_library:
        libs = {"thread": library_threads, "process": library_processes}
        if have_dask:
            libs["dask"] = library_dask
        for r in results:
            fn = libs.get(r.setup.executor)
            if fn is not None and not r.setup.external_workers:
                r.lib = fn(w, args.noop, args.ms, args.cpu)
                print(f"{r.setup.label}, library alone: "
                      + ", ".join(f"{k} {v:,.0f}/s" for k, v in r.lib.items()), flush=True)

    print()
    print(f"bench/executors.py: {args.noop:,} no-op, {args.ms:,} 1 ms and {args.cpu} "
          f"{CPU_SECONDS * 1000:.0f} ms CPU items per bulk, max_workers {w}, one server per "
          f"executor; bulkrunner counts to the last outcome committed; median (min-max) "
          f"over {args.rounds} round(s)")
    rows = []
    verdicts = []
    for r in results:
        s = r.setup
        ideal = (1 if s.executor == "thread" else cores) / CPU_SECONDS
        cpu = spread(r.cpu, "{:.1f}")
        ratio = (min(r.cpu) / ideal) if r.cpu else 0.0
        lib = r.lib

        def f(key: str, lib: dict[str, float] = lib) -> str:
            return f"{lib[key]:,.0f}" if key in lib else "-"

        lib_cpu = (f"{lib['cpu_one']:.1f} ({lib['cpu_one'] / ideal:.2f})"
                   if "cpu_one" in lib else "-")

        rows.append([s.label, f"{r.start_s:.1f}", f("noop_one"),
                     f("noop_batch"), spread(r.noop), f("ms_one"), f("ms_batch"),
                     spread(r.ms), lib_cpu, f"{cpu} ({ratio:.2f} of {ideal:.0f})",
                     str(r.workers_seen)])
        target = TARGETS.get(s.executor)
        if target and not s.external_workers and r.noop:
            verdicts.append(f"{s.label}: no-op {min(r.noop):,.0f}/s, target {target:,}: "
                            f"{'met' if min(r.noop) >= target else 'NOT met'}")
        if r.cpu:
            verdicts.append(f"{s.label}: 50 ms CPU {ratio:.2f} of the ideal, target "
                            f"{CPU_TARGET}: {'met' if ratio >= CPU_TARGET else 'NOT met'}")
    print_table(["executor", "start s", "lib no-op 1/msg", "lib no-op batched",
                 "bulkrunner no-op", "lib 1 ms 1/msg", "lib 1 ms batched", "bulkrunner 1 ms",
                 "lib 50 ms CPU (of ideal)", "bulkrunner 50 ms CPU (of ideal)",
                 "workers seen"], rows)
    print("(items/s; the ideal for 50 ms CPU items is cores / 0.05 s, one core for threads)")
    if not args.quick:
        for v in verdicts:
            print(v)
    for r in results:
        for fail in r.failures:
            print(f"FAILED {r.setup.label}: {fail}")
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_start:.0f} s")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
