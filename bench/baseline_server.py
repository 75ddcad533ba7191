"""The comparison servers of bench/submit.py, each run as its own process.

``floor``: a Flask route under waitress that does nothing but answer 202 with a small JSON
body: the most any Flask+waitress submission endpoint can do on this machine.

``wsgi``: no Flask at all, a bare WSGI callable under waitress (how much of the floor is
Flask).

``seed``: the pattern users write first: parse the JSON, ``ThreadPoolExecutor.submit`` the
task, keep the future in a dict, answer 202 with its id. Like bulkrunner in the benchmark,
its workers are first all occupied by a long sleep, so the figure is the submission alone
(submissions pile up in the pool's in-memory queue; nothing is durable).

``seed-run``: the same seed pattern with its workers free, so submissions run (the drain and
makespan figures). The body's ``task`` picks a function of bench/tasks.py (``noop``,
``nap``), ``params`` are its keyword arguments, and an ``items`` list makes one future per
item (each item's values overlay the params, as in bulkrunner). ``GET /done`` answers
``{"done": n, "failed": n, "last_finished": epoch seconds}``: how many futures have finished
and when the last one did (taken in the worker when the function returns, so polling
``/done`` adds no error).

Usage: ``python bench/baseline_server.py floor|seed|seed-run|wsgi [--threads 8]
[--workers 4]``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any

from flask import Flask, Response, jsonify, request
from tasks import nap, noop_i
from waitress import create_server

RUN_TASKS: dict[str, Callable[..., Any]] = {"noop": noop_i, "noop_i": noop_i, "nap": nap}


def echo(**params: Any) -> dict[str, Any]:
    return params


def floor_app() -> Flask:
    app = Flask("floor")

    @app.post("/api/v1/jobs")
    def submit() -> tuple[Response, int]:
        return jsonify({"id": "0"}), 202

    return app


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """No Flask at all: what waitress alone costs."""
    environ["wsgi.input"].read()
    start_response("202 Accepted", [("Content-Type", "application/json"),
                                     ("Content-Length", "11")])
    return [b'{"id": "0"}']


def seed_app(workers: int) -> Flask:
    app = Flask("seed")
    pool = ThreadPoolExecutor(workers)
    futures: dict[str, Future[Any]] = {}
    release = threading.Event()
    for _ in range(workers):  # occupy every worker, as bulkrunner's are in the benchmark
        pool.submit(release.wait, 3600)
    app.extensions["release"] = release

    @app.post("/api/v1/jobs")
    def submit() -> tuple[Response, int]:
        body = request.get_json()
        job_id = uuid.uuid4().hex
        futures[job_id] = pool.submit(echo, **(body.get("params") or {}))
        return jsonify({"id": job_id}), 202

    return app


class Completions:
    """How many submitted functions have returned (or raised), and when the last one did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.failed = 0
        self.last_finished = 0.0

    def run(self, fn: Callable[..., Any], params: dict[str, Any]) -> Any:
        ok = False
        try:
            result = fn(**params)
            ok = True
            return result
        finally:
            now = time.time()
            with self.lock:
                self.done += 1
                self.failed += not ok
                self.last_finished = max(self.last_finished, now)


def seed_run_app(workers: int) -> Flask:
    """The seed pattern with free workers: submissions run; ``GET /done`` counts them."""
    app = Flask("seed-run")
    pool = ThreadPoolExecutor(workers)
    futures: dict[str, list[Future[Any]]] = {}
    counts = Completions()

    @app.post("/api/v1/jobs")
    def submit() -> tuple[Response, int]:
        body = request.get_json()
        fn = RUN_TASKS[body["task"]]
        params = body.get("params") or {}
        job_id = uuid.uuid4().hex
        futures[job_id] = [pool.submit(counts.run, fn, {**params, **item})
                           for item in body.get("items") or [{}]]
        return jsonify({"id": job_id}), 202

    @app.get("/done")
    def done() -> Response:
        with counts.lock:
            return jsonify({"done": counts.done, "failed": counts.failed,
                            "last_finished": counts.last_finished})

    return app


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["floor", "seed", "seed-run", "wsgi"])
    ap.add_argument("--threads", type=int, default=8, help="waitress threads")
    ap.add_argument("--workers", type=int, default=4, help="seed pool workers")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    app: Any = (floor_app() if args.mode == "floor" else
                seed_app(args.workers) if args.mode == "seed" else
                seed_run_app(args.workers) if args.mode == "seed-run" else wsgi_app)
    server = create_server(app, host="127.0.0.1", port=0, threads=args.threads)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"{args.mode} serving on http://127.0.0.1:{server.effective_port}", flush=True)
    try:
        server.run()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.close()
        release = getattr(app, "extensions", {}).get("release")
        if release is not None:
            release.set()
    time.sleep(0.05)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
