"""A Flask app of a user's kind with bulkrunner embedded, and its tasks: used in-process by
tests/test_flask_ext.py and as a real app under waitress and gunicorn.

``create_app(db, marks)`` is the factory; ``from_env()`` builds it from ``$EMBED_DB`` and
``$EMBED_MARKS`` (``gunicorn 'tests.embed_app:from_env()'``). Every run of :func:`mark`
appends ``start <tag> <pid>`` and ``end <tag> <pid>`` lines to the marks file (O_APPEND:
whole lines, whatever the process), so a test can count how often each item ran and where.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, current_app, g, request

from bulkrunner.errors import BulkrunnerError
from bulkrunner.flask import BulkRunner

runner = BulkRunner()


def create_app(db: str, marks: str, *, executor: str = "thread", max_workers: int = 4,
               **tables: Any) -> Flask:
    """The app: a route that submits through ``runner.submit``, bulkrunner under /bulkrunner."""
    app = Flask(__name__)
    app.config["GREETING"] = "hello from the app"
    app.config["MARKS"] = marks
    app.config["BULKRUNNER"] = {
        "store": {"path": db},
        "executor": {"type": executor, "max_workers": max_workers},
        "server": {"shutdown_grace": 2},
        "jobs": {"retry_backoff": 0.05},
        "tasks": {"mark": "tests.embed_app:mark", "greet": "tests.embed_app:greet"},
        **tables,
    }
    runner.init_app(app)

    @app.post("/task")
    def task() -> tuple[dict[str, Any], int]:
        body = request.get_json()
        time.sleep(body.get("hold", 0))  # a slow route: keeps a gunicorn worker busy
        try:
            job = runner.submit(body["task"], body.get("params"), **body.get("options", {}))
        except BulkrunnerError as e:  # the app decides how to answer bulkrunner's errors
            return {"code": e.code, "details": e.details, "pid": os.getpid()}, 422
        return {"id": job["id"], "pid": os.getpid()}, 202

    @app.get("/task/<ident>")
    def status(ident: str) -> dict[str, Any]:
        return runner.get(ident)

    return app


def from_env() -> Flask:
    """The app for a real server: the database and the marks file from the environment."""
    return create_app(os.environ["EMBED_DB"], os.environ["EMBED_MARKS"])


def mark(tag: str, sleep: float = 0.0) -> dict[str, Any]:
    """Record a run of ``tag`` (start, then end after ``sleep`` seconds) in the app's marks
    file, found through ``current_app`` (so it fails outside the app context)."""
    path = current_app.config["MARKS"]
    _append(path, f"start {tag} {os.getpid()}\n")
    time.sleep(sleep)
    _append(path, f"end {tag} {os.getpid()}\n")
    return {"greeting": current_app.config["GREETING"], "pid": os.getpid()}


def greet(name: str) -> dict[str, Any]:
    """What the item sees of the app: its config, and whether ``g`` is fresh."""
    fresh = not hasattr(g, "seen")
    g.seen = name
    return {"greeting": current_app.config["GREETING"], "name": name, "fresh_g": fresh}


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
