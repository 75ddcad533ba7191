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

Usage: ``python bench/submit.py [--seconds 5] [--rounds 2]``. Takes about 1.5 minutes.
$BENCH_SRC=/path/to/checkout benchmarks another copy of bulkrunner; $BENCH_KEEP=1 keeps the
temp dir (server logs, database).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchutil import (
    BENCH,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs per target and mode")
    ap.add_argument("--max-workers", type=int, default=4, help="bulkrunner workers")
    ap.add_argument("--threads", type=int, default=8, help="waitress threads (all servers)")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    servers: dict[str, Server] = {}
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
        occupy_workers(servers["bulkrunner"], args.max_workers)
        script = write_lua(workdir / "post.lua", BODY)

        accepted = 0  # 2xx answers bulkrunner gave to echo submissions
        for name, srv in servers.items():  # warm-up: imports, caches, first WAL pages
            r = run_wrk(srv.url + "/api/v1/jobs", script, connections=8, threads=2,
                        seconds=2)
            if name == "bulkrunner":
                accepted += r.ok
        results: dict[tuple[str, str], list[WrkResult]] = {}
        cpu_ms: dict[tuple[str, str], list[float]] = {}
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

        time.sleep(0.5)  # requests wrk gave up on at its deadline still commit
        _, health = http_json("GET", servers["bulkrunner"].url + "/healthz")
        counts = count_jobs(workdir / "bench.db")
        rss_mb = {n: _rss_mb(s.pid) for n, s in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
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

    seq = results[("bulkrunner", "sequential")]
    conc = results[("bulkrunner", "concurrent")]
    ratio_c = statistics.median(
        100 * r.rps / f.rps for r, f in zip(conc, results[("floor", "concurrent")],
                                            strict=True))
    ratio_s = statistics.median(
        100 * r.rps / f.rps for r, f in zip(seq, results[("floor", "sequential")],
                                            strict=True))
    p99_s = statistics.median(r.p99_ms for r in seq)
    stored = counts.get("echo", 0)
    print()
    print(f"bulkrunner answered {accepted:,} echo submissions with 2xx; its database holds "
          f"{stored:,} echo jobs ({stored - accepted:+,} = requests in flight when wrk "
          f"stopped), {counts['items queued']:,} items queued, {counts['items running']} "
          f"running; /healthz inflight {health.get('inflight')}")
    print("RSS at the end: " + ", ".join(f"{n} {v:.0f} MB" for n, v in rss_mb.items()))
    print(f"target: throughput >= 85% of the floor: concurrent {ratio_c:.0f}% "
          f"{'PASS' if ratio_c >= 85 else 'FAIL'}, sequential {ratio_s:.0f}% "
          f"{'PASS' if ratio_s >= 85 else 'FAIL'}")
    print(f"target: p99 < 5 ms sequential: {p99_s:.2f} ms {'PASS' if p99_s < 5 else 'FAIL'}")
    print(f"target: every 202 stored: {'PASS' if stored >= accepted else 'FAIL'} "
          f"({stored:,} stored >= {accepted:,} accepted)")
    print(f"load average after: {loadavg()}; took {time.monotonic() - t_start:.0f} s")
    return 0 if stored >= accepted else 1


def _rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


if __name__ == "__main__":
    sys.exit(main())
