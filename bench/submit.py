"""Submissions per second and latency: bulkrunner against the floor and the seed pattern.

Four servers, each its own subprocess on a free loopback port, all under waitress with the
same number of waitress threads:

- ``wsgi``: a bare WSGI callable, no Flask (for reference: what waitress alone costs);
- ``floor``: a Flask route that does nothing (bench/baseline_server.py floor): the target's
  100%;
- ``seed``: a route calling ``ThreadPoolExecutor.submit`` (bench/baseline_server.py seed);
- ``bulkrunner``: a real ``bulkrunner serve`` (thread executor) whose workers are all busy
  with a long ``sleep`` job, so every ``echo`` submission is validated, committed to SQLite
  (synchronous=FULL) and queued, never run.

wrk loads each one with the same JSON POST, sequentially (``-c1 -t1``) and concurrently
(``-c8 -t2``), interleaved round by round so a busy moment of the machine hits all of them.
Afterwards the jobs in bulkrunner's database are counted: every 202 must be there.

"server CPU ms/req" is the server process's CPU time (all threads, from /proc) divided by
the requests answered: on 2 cores with the GIL, throughput is about 1 core / that figure.

In the same rounds one Python client (a persistent ``http.client.HTTPConnection``,
keep-alive) POSTs the same JSON body ``--client-requests`` times after a warm-up, one after
the other, each timed with ``time.perf_counter``: submissions/s and p50 for each target.

Two more servers (started and warmed up first, idle until then) have FREE workers, so that
submissions run; the four above stop before they are measured:

- ``seed-run`` (bench/baseline_server.py): the seed pattern, ``ThreadPoolExecutor(4)``, whose
  ``GET /done`` says how many futures finished and when the last one did;
- a fresh ``bulkrunner serve`` (thread executor, 4 workers, its own temp dir and database).

On each, from one keep-alive Python client, interleaved round by round:

- drain: ``--drain-jobs`` one-item no-op jobs (``noop``) submitted one by one; jobs/s from
  the first submit to the last job's finish;
- makespan: ``--makespan-items`` one-item jobs of a 25 ms sleep (``nap``), and one job of as
  many items; from the first submit to the last item's finish, over the ideal
  items * 0.025 s / workers.

The finish times are the servers' own (seed: taken in the worker; bulkrunner:
``finished_at`` in its database, read-only), so polling adds no error.

Usage: ``python bench/submit.py [--seconds 5] [--rounds 2] [--client-requests 2000]
[--drain-jobs 2000] [--makespan-items 400] [--flow-rounds 2]``. Takes about 2.5 minutes.
$BENCH_SRC=/path/to/checkout benchmarks another copy of bulkrunner; $BENCH_KEEP=1 keeps the
temp dir (server logs, databases).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchutil import (
    BENCH,
    KeepAlive,
    Server,
    WrkResult,
    bulkrunner_config,
    bulkrunner_server,
    http_json,
    loadavg,
    print_table,
    proc_cpu_seconds,
    proc_status_kb,
    remove_workdir,
    run_wrk,
    spread,
    write_lua,
)

BODY = {"task": "echo", "params": {"msg": "hi"}}
MODES = {"sequential": (1, 1), "concurrent": (8, 2)}   # connections, wrk threads
TARGETS = ("wsgi", "floor", "seed", "bulkrunner")
FLOW_TARGETS = ("seed", "bulkrunner")
T = TypeVar("T")
FLOW_TASKS = {"noop": "bench.tasks:noop_i", "nap": "bench.tasks:nap"}
NAP_S = 0.025
# (key, label) of the figures of the free-worker servers
FLOWS = (("drain", "drain: one-item no-op jobs"),
         ("makespan-jobs", "makespan: one-item 25 ms jobs"),
         ("makespan-items", "makespan: one job of 25 ms items"))


def occupy_workers(server: Server, n: int, timeout: float = 15.0) -> None:
    """Submit ``n`` long sleeps and wait until all ``n`` workers run one."""
    for _ in range(n):
        status, body = http_json("POST", server.url + "/api/v1/jobs",
                                 {"task": "sleep", "params": {"seconds": 3600}})
        if status != 202:
            raise RuntimeError(f"sleep submission answered {status}: {body}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, health = http_json("GET", server.url + "/healthz")
        if health.get("inflight") == n:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the workers did not all start a sleep: {health}")


def count_jobs(db: Path) -> dict[str, int]:
    """Jobs per task and queued items in bulkrunner's database (read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for all three counts
        out = dict(conn.execute("SELECT task, COUNT(*) FROM jobs GROUP BY task").fetchall())
        out["items queued"] = conn.execute(
            "SELECT COUNT(*) FROM items WHERE state = 'queued'").fetchone()[0]
        out["items running"] = conn.execute(
            "SELECT COUNT(*) FROM items WHERE state = 'running'").fetchone()[0]
        return out
    finally:
        conn.close()


# --------------------------------------------------------------------------- Python client
@dataclass
class ClientResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ok: int        # 202 answers, warm-up included
    sent: int      # requests sent, warm-up included

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def client_run(url: str, body: bytes, n: int, warmup: int) -> ClientResult:
    """``n`` sequential POSTs on one keep-alive connection after ``warmup`` untimed ones."""
    conn = KeepAlive(url)
    ok = 0
    lat: list[float] = []
    try:
        for _ in range(warmup):
            status, _ = conn.request("POST", "/api/v1/jobs", body)
            ok += status == 202
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            status, _ = conn.request("POST", "/api/v1/jobs", body)
            lat.append(time.perf_counter() - t)
            ok += status == 202
        total = time.perf_counter() - t0
    finally:
        conn.close()
    lat.sort()
    return ClientResult(requests=n, seconds=total, p50_ms=1000 * statistics.median(lat),
                        p99_ms=1000 * lat[min(n - 1, int(0.99 * n))], ok=ok, sent=n + warmup)


# --------------------------------------------------------------------------- free workers
@dataclass
class FlowResult:
    target: str
    flow: str
    jobs: int
    items: int
    done: int            # items finished (succeeded or failed)
    failed: int
    submit_s: float      # first submit to the last 202
    item_end_s: float    # first submit to the last item's finish
    job_end_s: float     # first submit to the last job's finish
    finished: bool

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.job_end_s if self.job_end_s > 0 else 0.0


class FlowServer:
    """A server with free workers: submit bodies one by one, wait until all have run."""

    name = ""

    def __init__(self, server: Server) -> None:
        self.server = server

    def snapshot(self) -> None:
        """Remember what is there before a flow (the counts below are since then)."""
        raise NotImplementedError

    def progress(self) -> tuple[int, int, int | None, float, float]:
        """(items finished, of which failed, jobs finished or None when a job is only its
        items, last item's end, last job's end)."""
        raise NotImplementedError

    def maybe_done(self) -> bool:
        """A cheap check before :meth:`progress` (True: may be done)."""
        return True

    def run(self, flow: str, bodies: Sequence[bytes], items: int, timeout: float
            ) -> FlowResult:
        self.snapshot()
        conn = KeepAlive(self.server.url)
        try:
            t0 = time.time()
            for body in bodies:
                status, answer = conn.request("POST", "/api/v1/jobs", body)
                if status != 202:
                    raise RuntimeError(f"{self.name}: a submission answered {status}: "
                                       f"{answer[:300]!r}")
            t_sub = time.time()
        finally:
            conn.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.maybe_done():
                done, failed, jobs, item_end, job_end = self.progress()
                if (jobs is None or jobs >= len(bodies)) and done >= items:
                    finished = True
                    break
            if time.monotonic() > deadline:
                done, failed, jobs, item_end, job_end = self.progress()
                finished = False
                item_end = job_end = time.time()
                break
            time.sleep(0.02)
        return FlowResult(target=self.name, flow=flow, jobs=len(bodies), items=items,
                          done=done, failed=failed, submit_s=t_sub - t0,
                          item_end_s=item_end - t0, job_end_s=job_end - t0,
                          finished=finished)


class SeedFlow(FlowServer):
    """bench/baseline_server.py seed-run: counts from its ``GET /done``."""

    name = "seed"

    def snapshot(self) -> None:
        _, self.before = http_json("GET", self.server.url + "/done")

    def progress(self) -> tuple[int, int, int | None, float, float]:
        _, now = http_json("GET", self.server.url + "/done")
        end = float(now["last_finished"])
        # a request's job is just its futures: done when they all are
        return (now["done"] - self.before["done"], now["failed"] - self.before["failed"],
                None, end, end)


class BulkrunnerFlow(FlowServer):
    """``bulkrunner serve``: /healthz says when its queue is empty, the database the rest."""

    name = "bulkrunner"

    def __init__(self, server: Server, db: Path) -> None:
        super().__init__(server)
        self.db = db
        self.seq = 0

    def _query(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("BEGIN")  # one snapshot
            return fn(conn)
        finally:
            conn.close()

    def snapshot(self) -> None:
        self.seq = self._query(
            lambda c: c.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0])

    def maybe_done(self) -> bool:
        _, health = http_json("GET", self.server.url + "/healthz")
        return bool(health.get("queued") == 0 and health.get("inflight") == 0)

    def progress(self) -> tuple[int, int, int | None, float, float]:
        def read(c: sqlite3.Connection) -> tuple[int, int, int, float, float]:
            done, failed, item_end = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(state = 'failed'), 0), MAX(finished_at) "
                "FROM items WHERE job_seq > ? AND finished_at IS NOT NULL",
                (self.seq,)).fetchone()
            jobs, job_end = c.execute(
                "SELECT COUNT(*), MAX(finished_at) FROM jobs "
                "WHERE seq > ? AND finished_at IS NOT NULL", (self.seq,)).fetchone()
            return done, failed, jobs, item_end or 0.0, job_end or 0.0
        result: tuple[int, int, int, float, float] = self._query(read)
        return result


def flow_bodies(flow: str, n: int) -> list[bytes]:
    """The request bodies of one flow: n one-item jobs, or one job of n items."""
    if flow == "drain":
        return [json.dumps({"task": "noop", "params": {"i": i}}).encode() for i in range(n)]
    if flow == "makespan-jobs":
        return [json.dumps({"task": "nap", "params": {"seconds": NAP_S, "i": i}}).encode()
                for i in range(n)]
    assert flow == "makespan-items"
    return [json.dumps({"task": "nap", "params": {"seconds": NAP_S},
                        "items": [{"i": i} for i in range(n)]}).encode()]


def start_flow_servers(workdir: Path, workers: int, threads: int) -> dict[str, FlowServer]:
    seed = Server("seed-run", [sys.executable, str(BENCH / "baseline_server.py"), "seed-run",
                               "--threads", str(threads), "--workers", str(workers)],
                  workdir).start()
    flows: dict[str, FlowServer] = {"seed": SeedFlow(seed)}
    free = workdir / "free-workers"
    free.mkdir()
    cfg = bulkrunner_config(free, max_workers=workers, threads=threads, tasks=FLOW_TASKS)
    flows["bulkrunner"] = BulkrunnerFlow(bulkrunner_server(free, cfg).start(),
                                         free / "bench.db")
    return flows


def warm_flows(flows: dict[str, FlowServer], timeout: float) -> None:
    """A few untimed runs: pool threads, first imports of bench.tasks, first WAL pages."""
    for f in flows.values():
        f.run("drain", flow_bodies("drain", 100), 100, timeout)
        f.run("makespan-items", flow_bodies("makespan-items", 8), 8, timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    ap.add_argument("--rounds", type=int, default=2,
                    help="wrk and Python-client runs per target and mode")
    ap.add_argument("--max-workers", type=int, default=4, help="bulkrunner and seed workers")
    ap.add_argument("--threads", type=int, default=8, help="waitress threads (all servers)")
    ap.add_argument("--client-requests", type=int, default=2000,
                    help="timed sequential POSTs per Python-client run")
    ap.add_argument("--client-warmup", type=int, default=200,
                    help="untimed POSTs before each Python-client run")
    ap.add_argument("--drain-jobs", type=int, default=2000, help="no-op jobs per drain")
    ap.add_argument("--makespan-items", type=int, default=400,
                    help="25 ms items per makespan run (as jobs, and as one job)")
    ap.add_argument("--flow-rounds", type=int, default=2,
                    help="drain and makespan runs per target")
    ap.add_argument("--flow-timeout", type=float, default=60.0,
                    help="seconds to wait for a drain or makespan run to finish")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    servers: dict[str, Server] = {}
    flows: dict[str, FlowServer] = {}
    t_start = time.monotonic()
    try:
        print(f"load average before: {loadavg()}", flush=True)
        for mode in ("wsgi", "floor", "seed"):
            servers[mode] = Server(mode, [sys.executable, str(BENCH / "baseline_server.py"),
                                          mode, "--threads", str(args.threads),
                                          "--workers", str(args.max_workers)],
                                   workdir).start()
        cfg = bulkrunner_config(workdir, max_workers=args.max_workers, threads=args.threads)
        servers["bulkrunner"] = bulkrunner_server(workdir, cfg).start()
        # the free-worker servers start now too (idle until the drain and makespan runs),
        # so every server has loaded its code before the first measurement
        flows = start_flow_servers(workdir, args.max_workers, args.threads)
        warm_flows(flows, args.flow_timeout)
        occupy_workers(servers["bulkrunner"], args.max_workers)
        script = write_lua(workdir / "post.lua", BODY)
        body = json.dumps(BODY).encode()

        accepted = 0  # 2xx answers bulkrunner gave to echo submissions
        for name, srv in servers.items():  # warm-up: imports, caches, first WAL pages
            r = run_wrk(srv.url + "/api/v1/jobs", script, connections=8, threads=2,
                        seconds=2)
            if name == "bulkrunner":
                accepted += r.ok
        results: dict[tuple[str, str], list[WrkResult]] = {}
        cpu_ms: dict[tuple[str, str], list[float]] = {}
        clients: dict[str, list[ClientResult]] = {}
        for rnd in range(args.rounds):
            for mode, (conns, threads) in MODES.items():
                for name in TARGETS:
                    srv = servers[name]
                    cpu0 = proc_cpu_seconds(srv.pid)
                    r = run_wrk(srv.url + "/api/v1/jobs", script, connections=conns,
                                threads=threads, seconds=args.seconds)
                    cpu = proc_cpu_seconds(srv.pid) - cpu0
                    results.setdefault((name, mode), []).append(r)
                    cpu_ms.setdefault((name, mode), []).append(
                        1000 * cpu / r.requests if r.requests else 0.0)
                    if name == "bulkrunner":
                        accepted += r.ok
                    bad = f" non-2xx {r.non2xx} socket errors {r.errors}" \
                        if r.non2xx or r.errors else ""
                    print(f"round {rnd + 1} {mode:10} {name:10} {r.rps:8,.0f} req/s "
                          f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms{bad} "
                          f"(load {loadavg()})", flush=True)
            for name in TARGETS:
                c = client_run(servers[name].url, body, args.client_requests,
                               args.client_warmup)
                clients.setdefault(name, []).append(c)
                if name == "bulkrunner":
                    accepted += c.ok
                bad = f" non-202 {c.sent - c.ok}" if c.ok != c.sent else ""
                print(f"round {rnd + 1} {'client':10} {name:10} {c.rps:8,.0f} req/s "
                      f"p50 {c.p50_ms:.2f} ms p99 {c.p99_ms:.2f} ms{bad} "
                      f"(load {loadavg()})", flush=True)

        time.sleep(0.5)  # requests wrk gave up on at its deadline still commit
        _, health = http_json("GET", servers["bulkrunner"].url + "/healthz")
        counts = count_jobs(workdir / "bench.db")
        rss_mb = {n: _rss_mb(s.pid) for n, s in servers.items()}
        for srv in servers.values():  # their busy workers would load the machine
            srv.stop()

        warm_flows(flows, args.flow_timeout)
        flow_results: dict[tuple[str, str], list[FlowResult]] = {}
        for rnd in range(args.flow_rounds):
            for flow, _ in FLOWS:
                n = args.drain_jobs if flow == "drain" else args.makespan_items
                bodies = flow_bodies(flow, n)
                for name in FLOW_TARGETS:
                    fr = flows[name].run(flow, bodies, n, args.flow_timeout)
                    flow_results.setdefault((name, flow), []).append(fr)
                    ideal = n * NAP_S / args.max_workers
                    fig = (f"{fr.jobs_per_s:8,.0f} jobs/s" if flow == "drain" else
                           f"makespan {fr.item_end_s:.3f} s = {fr.item_end_s / ideal:.3f} x "
                           f"ideal")
                    bad = "" if fr.finished and not fr.failed else \
                        f" FAILED {fr.failed} UNFINISHED {fr.items - fr.done}"
                    print(f"round {rnd + 1} {flow:14} {name:10} {fig}, submitted in "
                          f"{fr.submit_s:.2f} s{bad} (load {loadavg()})", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
        for f in flows.values():
            f.server.stop()
        remove_workdir(workdir)

    print()
    print(f"bench/submit.py: wrk POST {BODY} for {args.seconds:g} s per run, "
          f"{args.rounds} round(s); median (min-max) over rounds; waitress threads "
          f"{args.threads}; bulkrunner {args.max_workers} thread workers all busy")
    rows = []
    for mode in MODES:
        floor_rps = [r.rps for r in results[("floor", mode)]]
        for name in TARGETS:
            rs = results[(name, mode)]
            ratios = [100 * r.rps / f for r, f in zip(rs, floor_rps, strict=True)]
            rows.append([name, mode, spread([r.rps for r in rs]),
                         spread([r.p50_ms for r in rs], "{:.2f}"),
                         spread([r.p99_ms for r in rs], "{:.2f}"),
                         spread(cpu_ms[(name, mode)], "{:.3f}"),
                         spread(ratios, "{:.0f}%"),
                         str(sum(r.non2xx + r.errors for r in rs))])
    print_table(["target", "mode", "req/s", "p50 ms", "p99 ms", "server CPU ms/req",
                 "% of floor", "errors"], rows)

    print()
    print(f"Python client: one keep-alive http.client connection, {args.client_requests:,} "
          f"sequential POSTs after {args.client_warmup} untimed, same servers (workers busy)")
    rows = []
    for name in TARGETS:
        cs = clients[name]
        rows.append([name, spread([c.rps for c in cs]), spread([c.p50_ms for c in cs], "{:.3f}"),
                     spread([c.p99_ms for c in cs], "{:.3f}"),
                     spread(_per_round(cs, clients["floor"], lambda a, b: 100 * a.rps / b.rps),
                            "{:.0f}%"),
                     spread(_per_round(cs, clients["floor"], lambda a, b: a.p50_ms - b.p50_ms),
                            "{:+.3f}"),
                     str(sum(c.sent - c.ok for c in cs))])
    print_table(["target", "submissions/s", "p50 ms", "p99 ms", "% of floor",
                 "p50 - floor's ms", "non-202"], rows)

    print()
    print(f"free workers ({args.max_workers}, seed-run and a fresh bulkrunner serve), one "
          f"keep-alive Python client submitting one by one, {args.flow_rounds} round(s); "
          f"times from the first submit to the server's own finish time")
    rows = []
    for flow, label in FLOWS:
        n = args.drain_jobs if flow == "drain" else args.makespan_items
        ideal = n * NAP_S / args.max_workers
        for name in FLOW_TARGETS:
            fs = flow_results[(name, flow)]
            rows.append([label, name, f"{fs[0].jobs:,}", f"{fs[0].items:,}",
                         spread([f.submit_s for f in fs], "{:.2f}"),
                         spread([f.job_end_s for f in fs], "{:.3f}"),
                         spread([f.item_end_s for f in fs], "{:.3f}"),
                         spread([f.jobs_per_s for f in fs]) if flow == "drain" else "-",
                         "-" if flow == "drain" else
                         spread([f.item_end_s / ideal for f in fs], "{:.3f}"),
                         str(sum(f.failed for f in fs)),
                         "yes" if all(f.finished for f in fs) else "NO (timed out)"])
    print_table(["figure", "target", "jobs", "items", "submit s", "last job s",
                 "last item s", "jobs/s", "makespan / ideal", "failed", "finished"], rows)

    # ---- the four figures side by side, with their targets
    def wrk_c8(name: str) -> list[WrkResult]:
        return results[(name, "concurrent")]

    wrk_ratio = statistics.median(_per_round(wrk_c8("bulkrunner"), wrk_c8("floor"),
                                             lambda a, b: a.rps / b.rps))
    client_ratio = statistics.median(_per_round(clients["bulkrunner"], clients["floor"],
                                                lambda a, b: a.rps / b.rps))
    p50_diff = statistics.median(_per_round(clients["bulkrunner"], clients["floor"],
                                            lambda a, b: a.p50_ms - b.p50_ms))
    drain_ratio = statistics.median(_per_round(
        flow_results[("bulkrunner", "drain")], flow_results[("seed", "drain")],
        lambda a, b: a.jobs_per_s / b.jobs_per_s))
    ideal = args.makespan_items * NAP_S / args.max_workers

    def makespan(name: str, flow: str) -> list[float]:
        return [f.item_end_s / ideal for f in flow_results[(name, flow)]]

    def verdict(good: bool) -> str:
        return "PASS" if good else "FAIL"

    targets = [("wrk -c8 req/s", f"{wrk_ratio:.2f} x floor", ">= 0.60 x floor",
                wrk_ratio >= 0.60),
               ("Python client p50", f"{p50_diff:+.3f} ms vs floor", "<= floor + 0.5 ms",
                p50_diff <= 0.5),
               (f"drain {args.drain_jobs:,} jobs/s", f"{drain_ratio:.2f} x seed",
                ">= 0.75 x seed", drain_ratio >= 0.75)]
    summary = [
        ["wrk -c8 req/s (workers busy)", spread([r.rps for r in wrk_c8("floor")]),
         spread([r.rps for r in wrk_c8("seed")]),
         spread([r.rps for r in wrk_c8("bulkrunner")]), f"{wrk_ratio:.2f} x floor",
         ">= 0.60 x floor", verdict(wrk_ratio >= 0.60)],
        ["client submissions/s (sequential)", *(spread([c.rps for c in clients[n]])
                                                for n in ("floor", "seed", "bulkrunner")),
         f"{client_ratio:.2f} x floor", "", ""],
        ["client p50 ms (sequential)", *(spread([c.p50_ms for c in clients[n]], "{:.3f}")
                                         for n in ("floor", "seed", "bulkrunner")),
         f"{p50_diff:+.3f} ms vs floor", "<= floor + 0.5 ms", verdict(p50_diff <= 0.5)],
        [f"drain {args.drain_jobs:,} no-op jobs, jobs/s", "-",
         *(spread([f.jobs_per_s for f in flow_results[(n, "drain")]])
           for n in FLOW_TARGETS),
         f"{drain_ratio:.2f} x seed", ">= 0.75 x seed", verdict(drain_ratio >= 0.75)]]
    for flow, what in (("makespan-jobs", f"{args.makespan_items:,} jobs x 1 item"),
                       ("makespan-items", f"1 job x {args.makespan_items:,} items")):
        seed_m = statistics.median(makespan("seed", flow))
        bulk_m = statistics.median(makespan("bulkrunner", flow))
        summary.append([f"makespan / ideal {ideal:g} s, {what}", "-",
                        spread(makespan("seed", flow), "{:.3f}"),
                        spread(makespan("bulkrunner", flow), "{:.3f}"),
                        f"{bulk_m / seed_m:.3f} x seed's", "<= 1.02", verdict(bulk_m <= 1.02)])
        targets.append((f"makespan, {what}", f"{bulk_m:.3f} x ideal (seed {seed_m:.3f})",
                        "<= 1.02 x ideal", bulk_m <= 1.02))
    print()
    print("the four figures, median (min-max) over rounds; ratios are per round, then median")
    print_table(["figure", "floor", "seed", "bulkrunner", "bulkrunner", "target", "result"],
                summary)

    stored = counts.get("echo", 0)
    print()
    print(f"bulkrunner answered {accepted:,} echo submissions (wrk and the Python client) with "
          f"2xx; its database holds {stored:,} echo jobs ({stored - accepted:+,} = requests in "
          f"flight when wrk stopped), {counts['items queued']:,} items queued, "
          f"{counts['items running']} running; /healthz inflight {health.get('inflight')}")
    print("RSS at the end of the wrk rounds: "
          + ", ".join(f"{n} {v:.0f} MB" for n, v in rss_mb.items()))
    for label, fig, target, good in targets:
        print(f"target: {label}: bulkrunner {fig}, target {target}: {verdict(good)}")
    print(f"target: every 202 stored: {'PASS' if stored >= accepted else 'FAIL'} "
          f"({stored:,} stored >= {accepted:,} accepted)")
    flows_ok = all(f.finished and not f.failed for fs in flow_results.values() for f in fs)
    if not flows_ok:
        print("ERROR: a drain or makespan run timed out or had failed items (see above)")
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_start:.0f} s")
    return 0 if stored >= accepted and flows_ok else 1


def _per_round(xs: Sequence[T], ys: Sequence[T], fn: Callable[[T, T], float]) -> list[float]:
    """``fn`` of each round's pair (a target's result and the reference's, same round)."""
    return [fn(x, y) for x, y in zip(xs, ys, strict=True)]


def _rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


if __name__ == "__main__":
    sys.exit(main())
