"""What pacing costs, and what fair share buys.

1. **Claim cost.** A store seeded with ``--items`` queued items (default 1,000,000) spread
   over ``--jobs`` jobs (default 10,000) of four tasks, drained by the dispatcher's own turn
   (record the last turn's outcomes, claim the next ``--batch`` items) with no executor in
   between, so the figure is the claim path alone: the claim policy and its SQL. Side by side
   on copies of the same database: FIFO with no limits (the baseline) and fair share with
   two limited tasks (one ``concurrency``, one ``rate_limit``). Target: claims per second
   with pacing at 0.8 or more of the baseline's.
2. **A one-item job behind a bulk.** A real server (thread executor, 4 workers) runs a
   ``--bulk``-item job (default 100,000) of ``--item-ms`` ms items; one-item jobs of the same
   task are submitted while it runs, and each one's wait (its start minus its submission) is
   measured, with fair share and, for comparison, without (FIFO: it waits for the bulk, so
   that run uses a smaller bulk and says so). Target: under one item's run time + 50 ms.

``python bench/pacing.py`` for the full run; ``--quick`` for a smoke run (100,000 items in
1,000 jobs, a 5,000-item bulk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import (
    bulkrunner_config,
    bulkrunner_server,
    http_json,
    loadavg,
    print_table,
    remove_workdir,
    timestamp,
)
from bulkrunner.config import Rate
from bulkrunner.server.pacing import Pacer
from bulkrunner.store import Finish, NewJob, Store

TASKS = ("a", "b", "limited", "rated")


def seed(path: str, items: int, jobs: int) -> float:
    """A database with ``items`` queued items in ``jobs`` jobs; returns seconds taken."""
    t0 = time.perf_counter()
    store = Store(path)
    per = items // jobs
    overlay = [None] * per
    for j in range(jobs):
        store.insert_job(NewJob(id=os.urandom(16).hex(), task=TASKS[j % len(TASKS)],
                                params={"j": j}, items=overlay))
    store.close()
    return time.perf_counter() - t0


def drain(path: str, claims: int, batch: int, fair: bool, limited: bool
          ) -> dict[str, float]:
    """Claim ``claims`` items ``batch`` at a time, recording each turn's claims as
    succeeded in the next; returns claims per second and the turn's p50/p99 (ms)."""
    store = Store(path)
    limits: dict[str, tuple[int, Rate | None]] = {}
    if limited:
        # Limits that hold some items back but leave the claim path busy: a concurrency
        # of 2 (its items end at the next turn) and a rate far above the drain's share.
        limits = {"limited": (2, None), "rated": (0, Rate(200_000, 1.0, "200000/s"))}
    pacer = Pacer(fair_share=fair, limits=limits)
    t0 = time.perf_counter()
    pacer.load(store.waiting_jobs(), store.paused_tasks(), time.time())
    load_s = time.perf_counter() - t0
    done = 0
    last: list[Finish] = []
    turns: list[float] = []
    t0 = time.perf_counter()
    while done < claims:
        s = time.perf_counter()
        turn = store.turn(last, batch, planner=pacer)
        turns.append(time.perf_counter() - s)
        for c in turn.claimed:
            pacer.ended(c.task)
        last = [Finish(c.job_seq, c.index, c.claim, ok=True, result="null")
                for c in turn.claimed]
        done += len(turn.claimed)
        if not turn.claimed:
            break
    elapsed = time.perf_counter() - t0
    store.close()
    turns.sort()
    return {"claims": done, "per_s": done / elapsed, "p50_ms": turns[len(turns) // 2] * 1e3,
            "p99_ms": turns[int(len(turns) * 0.99)] * 1e3, "load_s": load_s,
            "jobs": pacer.jobs()}


def claim_cost(args: argparse.Namespace, work: Path) -> bool:
    base = str(work / "seed.db")
    took = seed(base, args.items, args.jobs)
    print(f"seeded {args.items:,} queued items in {args.jobs:,} jobs in {took:.1f} s")
    rows, rates = [], {}
    for name, fair, limited in (("FIFO, no limits", False, False),
                                ("fair share, no limits", True, False),
                                ("fair share + 2 limited tasks", True, True)):
        path = str(work / f"{name.split(',')[0].replace(' ', '-')}-{int(limited)}.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(base + suffix):
                shutil.copy(base + suffix, path + suffix)
        r = drain(path, args.claims, args.batch, fair, limited)
        rates[name] = r["per_s"]
        rows.append([name, f"{r['claims']:,.0f}", f"{r['per_s']:,.0f}", f"{r['p50_ms']:.2f}",
                     f"{r['p99_ms']:.2f}", f"{r['load_s'] * 1e3:.0f}"])
    print_table(["claim policy", "claimed", "claims/s", "turn p50 ms", "turn p99 ms",
                 "view load ms"], rows)
    limits_cost = rates["fair share + 2 limited tasks"] / rates["fair share, no limits"]
    paced_cost = rates["fair share + 2 limited tasks"] / rates["FIFO, no limits"]
    ok = limits_cost >= 0.8
    print(f"with limits / the same drain without: {limits_cost:.2f} (target >= 0.80: "
          f"{'met' if ok else 'MISSED'}); against FIFO without limits: {paced_cost:.2f} "
          f"({'met' if paced_cost >= 0.8 else 'MISSED'})")
    return ok


def small_job_wait(args: argparse.Namespace, work: Path, fair: bool, bulk: int
                   ) -> list[float]:
    """Waits (seconds) of one-item jobs submitted behind a running ``bulk``-item job."""
    d = work / ("fair" if fair else "fifo")
    d.mkdir()
    cfg = bulkrunner_config(d, max_workers=4, tasks={"nap": "bench.tasks:nap"})
    cfg.write_text(cfg.read_text().replace("max_workers = 4",
                                           f"max_workers = 4\nfair_share = {str(fair).lower()}"))
    srv = bulkrunner_server(d, cfg).start()
    seconds = args.item_ms / 1000
    waits: list[float] = []
    try:
        status, job = http_json("POST", srv.url + "/api/v1/jobs", {
            "task": "nap", "params": {"seconds": seconds},
            "items": [{"i": i} for i in range(bulk)]})
        assert status == 202, job
        deadline = time.monotonic() + 60
        while http_json("GET", f"{srv.url}/api/v1/jobs/{job['id']}")[1]["items"][
                "succeeded"] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(args.probes if fair else 1):
            _, small = http_json("POST", srv.url + "/api/v1/jobs",
                                 {"task": "nap", "params": {"seconds": seconds}})
            deadline = time.monotonic() + (600 if not fair else 30)
            while True:
                _, s = http_json("GET", f"{srv.url}/api/v1/jobs/{small['id']}")
                if s["started_at"] or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if s["started_at"]:
                waits.append(timestamp(s["started_at"]) - timestamp(s["created_at"]))
        http_json("POST", f"{srv.url}/api/v1/jobs/{job['id']}/cancel")
    finally:
        srv.stop()
    return waits


def fairness(args: argparse.Namespace, work: Path) -> bool:
    item = args.item_ms / 1000
    fair = small_job_wait(args, work, True, args.bulk)
    fifo_bulk = min(args.bulk, 2_000)
    fifo = small_job_wait(args, work, False, fifo_bulk)
    rows = [[f"fair share, behind {args.bulk:,} items", str(len(fair)),
             f"{statistics.median(fair) * 1e3:.1f}", f"{max(fair) * 1e3:.1f}"]]
    if fifo:
        rows.append([f"FIFO, behind {fifo_bulk:,} items", str(len(fifo)),
                     f"{statistics.median(fifo) * 1e3:.0f}", f"{max(fifo) * 1e3:.0f}"])
    print_table(["one-item job", "probes", "wait p50 ms", "wait max ms"], rows)
    target = (item + 0.05) * 1e3
    ok = max(fair) * 1e3 < target
    print(f"fair share: the longest wait {max(fair) * 1e3:.1f} ms against one item's run "
          f"time + 50 ms = {target:.0f} ms ({'met' if ok else 'MISSED'})")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run, small sizes")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--claims", type=int, default=200_000, help="items claimed per drain")
    ap.add_argument("--batch", type=int, default=4,
                    help="items claimed per turn (free slots: max_workers is 4 by default)")
    ap.add_argument("--bulk", type=int, default=100_000)
    ap.add_argument("--item-ms", type=float, default=10.0)
    ap.add_argument("--probes", type=int, default=20)
    args = ap.parse_args()
    if args.quick:
        args.items, args.jobs, args.claims, args.bulk, args.probes = (
            100_000, 1_000, 20_000, 5_000, 5)
    print(f"load average before: {loadavg()}")
    work = Path(tempfile.mkdtemp(prefix="bench-pacing-"))
    try:
        ok = claim_cost(args, work)
        ok = fairness(args, work) and ok
    finally:
        remove_workdir(work)
    print(f"load average after: {loadavg()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
