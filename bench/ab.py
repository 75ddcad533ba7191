"""This checkout against another one, interleaved: is a change faster, or was the machine?

The speed of this machine drifts by 15-20 % within minutes, so a "before" run followed by
an "after" run says little. Here one server of the base (``--base``: a git ref, checked out
into a temporary worktree, or ``--base-dir``: a checkout) and one of this checkout take
turns, ``--rounds`` times, each a fresh ``bulkrunner serve`` (its own temp dir and
database) draining the same bulk on the same executor: no-op items (``bench.tasks:noop_i``)
by default, or 1 ms sleeps (``--task nap``). Per round and server: items per second (from
the 202 to the job's ``finished_at``) and the server's CPU time per item (all its threads,
from /proc; on two cores with the GIL it moves much less than the rate does).

The result says, besides the medians, in how many rounds this checkout beat the base: a
change that wins 7 rounds of 8 is faster; one that wins 4 is noise, whatever the medians.

Usage: ``python bench/ab.py --base HEAD~1 [--rounds 6] [--items 50000] [--workers 2]
[--executor thread|process] [--task noop|nap]``. Takes about 15 s a round for no-op items.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: the tasks are imported as bench.*
    sys.path.insert(0, str(_ROOT))

from bench.benchutil import (  # noqa: E402
    ROOT,
    Server,
    bulkrunner_config,
    loadavg,
    print_table,
    proc_cpu_seconds,
    remove_workdir,
    spread,
)
from bench.executors import run_bulk, wait_healthy  # noqa: E402

TASKS = {"noop": "bench.tasks:noop_i", "nap": "bench.tasks:nap"}


@dataclass
class Run:
    side: str           # "base" or "this"
    rate: float         # items per second
    cpu_us: float       # server CPU microseconds per item


def one_run(side: str, src: Path, args: argparse.Namespace) -> Run:
    """A fresh server of checkout ``src``: a warm-up bulk, then the timed one."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-ab-{side}-"))
    cfg = bulkrunner_config(workdir, max_workers=args.workers, tasks=TASKS,
                            jobs="max_items = 1000000", executor=args.executor)
    server = Server(side, [sys.executable, "-m", "bulkrunner", "--config", str(cfg), "serve",
                           "--log-level", "info"], workdir, src=src)
    try:
        server.start()
        wait_healthy(server.url, 60)
        params = {"seconds": 0.001} if args.task == "nap" else None
        run_bulk(server.url, args.task, min(2000, args.items), args.timeout, params)
        cpu0 = proc_cpu_seconds(server.pid)
        rate, _ = run_bulk(server.url, args.task, args.items, args.timeout, params)
        cpu = proc_cpu_seconds(server.pid) - cpu0
        return Run(side, rate, 1e6 * cpu / args.items)
    finally:
        server.stop()
        remove_workdir(workdir)


def base_checkout(args: argparse.Namespace, tmp: Path) -> Path:
    """The base's source tree: ``--base-dir``, or ``--base`` checked out into ``tmp``."""
    if args.base_dir:
        return Path(args.base_dir).resolve()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp),
                    args.base], check=True, capture_output=True, text=True)
    return tmp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = ap.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="a git ref of this repository (e.g. HEAD~1, main)")
    base.add_argument("--base-dir", help="another checkout of bulkrunner")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of one run each")
    ap.add_argument("--items", type=int, default=50_000, help="items in the timed bulk")
    ap.add_argument("--workers", type=int, default=2, help="executor.max_workers")
    ap.add_argument("--executor", choices=("thread", "process"), default="thread")
    ap.add_argument("--task", choices=tuple(TASKS), default="noop")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per bulk at most")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-base-")) / "src"
    try:
        src = {"base": base_checkout(args, tmp), "this": ROOT}
        runs: list[tuple[Run, Run]] = []
        for r in range(args.rounds):
            # Alternate who goes first, so that a drift within a round favours neither.
            order = ("base", "this") if r % 2 == 0 else ("this", "base")
            got = {side: one_run(side, src[side], args) for side in order}
            runs.append((got["base"], got["this"]))
            print(f"round {r + 1}: base {got['base'].rate:,.0f}/s "
                  f"({got['base'].cpu_us:.1f} us/item), this {got['this'].rate:,.0f}/s "
                  f"({got['this'].cpu_us:.1f} us/item)  (load {loadavg()})", flush=True)
    finally:
        if not args.base_dir and tmp.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tmp)], capture_output=True)
        shutil.rmtree(tmp.parent, ignore_errors=True)
    report(runs, args)
    return 0


def report(runs: list[tuple[Run, Run]], args: argparse.Namespace) -> None:
    """The medians, and the rounds this checkout won, by rate and by CPU per item."""
    base = [b for b, _ in runs]
    this = [t for _, t in runs]
    faster = sum(t.rate > b.rate for b, t in runs)
    leaner = sum(t.cpu_us < b.cpu_us for b, t in runs)
    print()
    print(f"bench/ab.py: {args.items:,} {args.task} items on the {args.executor} executor "
          f"({args.workers} workers), {len(runs)} rounds, base {args.base or args.base_dir}")
    print_table(
        ["", "items/s, median (min-max)", "server CPU us/item, median (min-max)"],
        [[side, spread([x.rate for x in xs]), spread([x.cpu_us for x in xs], "{:.1f}")]
         for side, xs in (("base", base), ("this", this))])
    ratio = statistics.median(t.rate / b.rate for b, t in runs)
    print(f"this checkout: {ratio:.3f}x the base's rate (median of the rounds' ratios); "
          f"faster in {faster} of {len(runs)} rounds, less CPU per item in {leaner}")


if __name__ == "__main__":
    sys.exit(main())
