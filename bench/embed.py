"""bulkrunner embedded in a Flask app: how fast a standby takes dispatching over, and what
``runner.submit`` costs in-process against a submission over HTTP.

Takeover: the app (this module's ``app_from_env()``) under gunicorn with two workers, each
started at boot by a ``post_worker_init`` hook, so one dispatches and one stands by. Each
round SIGKILLs the worker holding the dispatcher lease, then times, from the kill:

- ``lease``: until another worker holds the lease (the database polled every 5 ms);
- ``job``: until a one-item job, submitted to the surviving worker right after the kill,
  has finished (its ``finished_at`` in the database): how long work waits, end to end.

Then it waits for gunicorn's replacement worker to stand by, and goes again. A second
series SIGSTOPs the holder instead (a frozen process, or one on another machine: its pid
cannot be seen to be gone, so only the lease running out tells), then SIGKILLs it once
the lease was taken. Median, min and max over ``--takeovers`` rounds (10) of each.

Submit latency, with every worker busy on a long ``sleep`` so that nothing submitted runs
(each submission is checked, committed with synchronous=FULL and queued), ``--submits``
(2000) timed calls after a warm-up, p50 / p99 / mean in ms:

- ``runner.submit`` in-process: this process, an app with the extension, inside
  ``app.app_context()`` (no HTTP, no request);
- ``route``: a keep-alive HTTP client POSTing to the app's own route that calls
  ``runner.submit`` (the app under waitress, 8 threads, one process);
- ``api``: the same client POSTing the same job to the mounted API
  (``POST /bulkrunner/api/v1/jobs``) of the same server.

Usage: ``python bench/embed.py [--takeovers 10] [--submits 2000]``; ``--quick`` (3
takeovers, 200 submits) checks that it runs. $BENCH_KEEP=1 keeps the temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flask import Flask, request

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchutil import KeepAlive, remove_workdir  # noqa: E402
from bulkrunner.flask import BulkRunner  # noqa: E402

runner = BulkRunner()
_HOOK = """import os, sys
def post_worker_init(worker):
    from bench.embed import runner
    runner.start(worker.wsgi)
    print(f"BENCH standing by {os.getpid()}", file=sys.stderr, flush=True)
"""


def make_app(db: str, max_workers: int = 4) -> Flask:
    """The benchmark's app: built-in tasks, a route that submits with ``runner.submit``."""
    app = Flask(__name__)
    app.config["BULKRUNNER"] = {"store": {"path": db}, "server": {"shutdown_grace": 0},
                                "executor": {"max_workers": max_workers}}
    runner.init_app(app)

    @app.post("/task")
    def task() -> tuple[dict[str, Any], int]:
        body = request.get_json()
        job = runner.submit(body["task"], body.get("params"))
        return {"id": job["id"]}, 202

    return app


def app_from_env() -> Flask:
    """The app for gunicorn and waitress: the database from ``$BENCH_DB``."""
    return make_app(os.environ["BENCH_DB"])


# --------------------------------------------------------------------------- processes
class Proc:
    """A server subprocess whose log says where it listens; killed as a process group."""

    def __init__(self, argv: list[str], workdir: Path, db: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_DB": str(db)}
        for var in ("BULKRUNNER_URL", "BULKRUNNER_CONFIG", "BULKRUNNER_TOKEN"):
            env.pop(var, None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.log()}")
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise RuntimeError(f"{pattern!r} x{count} not seen within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def post(url: str, body: dict[str, Any]) -> Any:
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def holder_pid(conn: sqlite3.Connection) -> int | None:
    try:
        row = conn.execute("SELECT holder, expires FROM leases WHERE name = 'dispatcher'"
                           ).fetchone()
    except sqlite3.OperationalError:
        return None
    if row is None or row[1] < time.time():
        return None
    return int(str(row[0]).split(":")[1])


def finished_at(conn: sqlite3.Connection, ident: str) -> float | None:
    row = conn.execute("SELECT finished_at FROM jobs WHERE id = ?", (ident,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


# --------------------------------------------------------------------------- takeover
def takeovers(workdir: Path, rounds: int, sig: int) -> tuple[list[float], list[float]]:
    db = workdir / f"takeover-{sig}.db"
    conf = workdir / "gunicorn.conf.py"
    conf.write_text(_HOOK)
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:0",
            "--no-control-socket", "-c", str(conf), "bench.embed:app_from_env()"]
    g = Proc(argv, workdir, db, "gunicorn")
    lease_s: list[float] = []
    job_s: list[float] = []
    try:
        g.url = g.wait_for(r"Listening at: (http://\S+)")[0]
        standing = 2
        g.wait_for(r"BENCH standing by (\d+)", standing)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        for _ in range(rounds):
            deadline = time.monotonic() + 30
            while (old := holder_pid(conn)) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if old is None:
                raise RuntimeError("nobody holds the lease")
            os.kill(old, sig)
            killed_mono, killed_wall = time.monotonic(), time.time()
            # Submitted to whichever worker answers: the dead one does not.
            ident = post(g.url + "/task", {"task": "echo", "params": {"n": 1}})["id"]
            lease = job = None
            while (lease is None or job is None) and time.monotonic() - killed_mono < 60:
                now = holder_pid(conn)
                if lease is None and now not in (None, old):
                    lease = time.monotonic() - killed_mono
                end = finished_at(conn, ident)
                if job is None and end is not None:
                    job = end - killed_wall
                time.sleep(0.005)
            if lease is None or job is None:
                raise RuntimeError(f"no takeover within 60 s:\n{g.log()}")
            if sig != signal.SIGKILL:
                os.kill(old, signal.SIGKILL)  # the frozen one: gunicorn replaces it
            lease_s.append(lease)
            job_s.append(job)
            standing += 1
            g.wait_for(r"BENCH standing by (\d+)", standing)  # the replacement worker
        conn.close()
    finally:
        g.stop()
    return lease_s, job_s


# --------------------------------------------------------------------------- latency
def percentiles(lat: list[float]) -> tuple[float, float, float]:
    lat = sorted(lat)
    return (1000 * statistics.median(lat), 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            1000 * statistics.fmean(lat))


def occupy(submit: Any, n: int) -> None:
    for _ in range(n):
        submit({"task": "sleep", "params": {"seconds": 3600}})


def in_process(workdir: Path, n: int, warmup: int) -> list[float]:
    app = make_app(str(workdir / "inproc.db"))
    try:
        with app.app_context():
            occupy(lambda body: runner.submit(body["task"], body["params"]), 4)
            for _ in range(warmup):
                runner.submit("echo", {"n": 1})
            lat = []
            for _ in range(n):
                t = time.perf_counter()
                runner.submit("echo", {"n": 1})
                lat.append(time.perf_counter() - t)
        return lat
    finally:
        runner.close(app, grace=0)


def over_http(workdir: Path, n: int, warmup: int) -> dict[str, list[float]]:
    db = workdir / "http.db"
    argv = [sys.executable, "-m", "waitress", "--listen=127.0.0.1:0", "--threads=8",
            "--call", "bench.embed:app_from_env"]
    w = Proc(argv, workdir, db, "waitress")
    out: dict[str, list[float]] = {}
    try:
        w.url = w.wait_for(r"Serving on (http://\S+)")[0]
        occupy(lambda body: post(w.url + "/task", body), 4)
        body = json.dumps({"task": "echo", "params": {"n": 1}}).encode()
        client = KeepAlive(w.url)
        try:
            for name, path in (("route", "/task"), ("api", "/bulkrunner/api/v1/jobs"),
                               ("route ", "/task"), ("api ", "/bulkrunner/api/v1/jobs")):
                for _ in range(warmup):
                    client.request("POST", path, body)
                lat = out.setdefault(name.strip(), [])
                for _ in range(n // 2):  # two rounds each, interleaved
                    t = time.perf_counter()
                    status, _ = client.request("POST", path, body)
                    lat.append(time.perf_counter() - t)
                    if status != 202:
                        raise RuntimeError(f"{path} answered {status}")
        finally:
            client.close()
    finally:
        w.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--takeovers", type=int, default=10)
    ap.add_argument("--submits", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="3 takeovers, 200 submits")
    args = ap.parse_args()
    if args.quick:
        args.takeovers, args.submits = 3, 200
    warmup = max(20, args.submits // 10)
    workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        for sig, what in ((signal.SIGKILL, "SIGKILL of the lease holder (its pid is gone)"),
                          (signal.SIGSTOP, "SIGSTOP of the lease holder (its lease runs "
                                           "out)")):
            lease_s, job_s = takeovers(workdir, args.takeovers, sig)
            print(f"takeover after {what}, {args.takeovers} rounds, gunicorn -w 2:")
            for name, xs in (("lease taken", lease_s), ("job finished", job_s)):
                print(f"  {name:<13} median {statistics.median(xs):6.3f} s   "
                      f"min {min(xs):6.3f}   max {max(xs):6.3f}")
        rows = {"runner.submit": in_process(workdir, args.submits, warmup),
                **over_http(workdir, args.submits, warmup)}
        print(f"\nsubmit latency, ms ({args.submits} timed each, workers busy):")
        print(f"  {'':<14}{'p50':>8}{'p99':>8}{'mean':>8}")
        for name, lat in rows.items():
            p50, p99, mean = percentiles(lat)
            print(f"  {name:<14}{p50:8.3f}{p99:8.3f}{mean:8.3f}")
    finally:
        remove_workdir(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
