"""bulkrunner.flask: the extension in a user's Flask app, in-process and under waitress.

The app (tests/embed_app.py) submits from its own route with ``runner.submit``; its tasks
read ``current_app``; the API, /healthz, /metrics and the web page are mounted under
/bulkrunner. Real SQLite files, real threads; the waitress tests run the app as a real
server process and kill it with SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Blueprint, Flask, abort, request

from bulkrunner import errors
from bulkrunner.flask import BulkRunner
from tests import embed_app
from tests.conftest import FINISHED, child_env, toml_config, wait_for, wait_job_state

MOUNT = "/bulkrunner"
JOBS = f"{MOUNT}/api/v1/jobs"


# ------------------------------------------------------------------ helpers (also for gunicorn)
def read_marks(path: Path) -> tuple[Counter[str], Counter[str], dict[str, list[int]]]:
    """(starts per tag, ends per tag, pids that started each tag) from a marks file."""
    starts: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    where: dict[str, list[int]] = {}
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        kind, tag, pid = line.split()
        (starts if kind == "start" else ends)[tag] += 1
        if kind == "start":
            where.setdefault(tag, []).append(int(pid))
    return starts, ends, where


class AppProcess:
    """The embedding app as a real server process (waitress or gunicorn) in ``cwd``; its URL
    is read from the server's log. Killed (its whole process group) by :meth:`kill`."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str],
                 ready: str = r"(?:Serving on|Listening at:) (http://\S+)") -> None:
        self.argv, self.cwd, self.env, self.ready = argv, cwd, env, ready
        self.log_path = cwd / f"app-{len(list(cwd.glob('app-*.log')))}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> AppProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def up() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            m = re.search(self.ready, self.log())
            return m.group(1) if m else None

        self.url = wait_for(up, timeout, f"the app did not start; log {self.log_path}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash, or kill -9)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=10, **kw)


def submit_marks(app: AppProcess, tags: list[str], sleep: float) -> dict[str, str]:
    """Submit one ``mark`` job per tag through the app's own route; tag -> job id."""
    ids = {}
    for tag in tags:
        r = app.post("/task", json={"task": "mark", "params": {"tag": tag, "sleep": sleep}})
        assert r.status_code == 202, r.text
        ids[tag] = r.json()["id"]
    return ids


def wait_all_succeeded(app: AppProcess, ids: dict[str, str], timeout: float) -> None:
    """Poll the mounted API until every job has finished; each must have succeeded."""
    def done() -> list[dict[str, Any]] | None:
        jobs = []
        for ident in ids.values():
            r = app.get(f"{JOBS}/{ident}")
            assert r.status_code == 200, r.text
            if r.json()["state"] not in FINISHED:
                return None
            jobs.append(r.json())
        return jobs
    jobs = wait_for(done, timeout, f"all {len(ids)} jobs finish", interval=0.2)
    bad = [j for j in jobs if j["state"] != "succeeded"]
    assert not bad, bad[:3]
    assert all(j["result"]["greeting"] == "hello from the app" for j in jobs)


# ------------------------------------------------------------------ in-process
@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Factory of embedding apps over one database in ``tmp_path``; closed after the test."""
    apps: list[Flask] = []

    def make(**kw: Any) -> Flask:
        app = embed_app.create_app(str(tmp_path / "jobs.db"), str(tmp_path / "marks"), **kw)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        embed_app.runner.close(app, grace=0)


def wait_mounted_job(client: Any, ident: str, timeout: float = 20) -> dict[str, Any]:
    def fetch() -> dict[str, Any]:
        r = client.get(f"{JOBS}/{ident}")
        assert r.status_code == 200, r.get_data(as_text=True)
        job: dict[str, Any] = r.get_json()
        return job
    return wait_job_state(fetch, timeout, f"job {ident}")


def test_a_route_submits_and_the_task_runs_in_the_app_context(make_app: Callable[..., Flask],
                                                              tmp_path: Path) -> None:
    app = make_app()
    client = app.test_client()
    r = client.post("/task", json={"task": "greet", "params": {"name": "ada"}})
    assert r.status_code == 202, r.get_data(as_text=True)
    job = wait_mounted_job(client, r.get_json()["id"])
    assert job["state"] == "succeeded", job
    assert job["result"] == {"greeting": "hello from the app", "name": "ada", "fresh_g": True}
    # The app's own route reads the same job through runner.get.
    assert client.get(f"/task/{job['id']}").get_json()["state"] == "succeeded"
    # Every item has an app context of its own: a fresh g, torn down after it.
    with app.app_context():
        bulk = embed_app.runner.submit("greet", items=[{"name": f"n{i}"} for i in range(6)])
    assert bulk["items"]["total"] == 6
    done = wait_mounted_job(client, bulk["id"])
    assert done["state"] == "succeeded", done
    items = client.get(f"{JOBS}/{bulk['id']}/items").get_json()["items"]
    assert all(i["result"]["fresh_g"] for i in items), items


def test_teardown_runs_after_each_item(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    torn: list[str | None] = []

    @app.teardown_appcontext
    def record(exc: BaseException | None) -> None:
        from flask import g
        torn.append(g.get("seen"))

    with app.app_context():
        job = embed_app.runner.submit("greet", items=[{"name": "a"}, {"name": "b"}])
    torn.clear()  # the app context of the submission itself
    wait_mounted_job(app.test_client(), job["id"])
    wait_for(lambda: len([t for t in torn if t in ("a", "b")]) == 2, 5,
             "a teardown after each of the two items")
    assert sorted(t for t in torn if t in ("a", "b")) == ["a", "b"]


def test_flask_sqlalchemy_sessions_work_and_are_removed_after_each_item(
        tmp_path: Path) -> None:
    flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
    import sqlalchemy as sa

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'app.db'}"
    app.config["BULKRUNNER"] = {"store": {"path": str(tmp_path / "jobs.db")},
                                "tasks": {"save": "tests.test_flask_ext:save_row"}}
    db = flask_sqlalchemy.SQLAlchemy(app)
    app.extensions["test_rows"] = sa.Table(
        "rows", db.metadata, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tag", sa.String(20)))
    runner = BulkRunner(app)
    try:
        with app.app_context():
            db.create_all()
            # One item leaves its change uncommitted: the teardown rolls it back.
            job = runner.submit("save", items=[{"tag": "kept", "commit": True},
                                               {"tag": "dropped", "commit": False}])
        done = wait_mounted_job(app.test_client(), job["id"])
        assert done["state"] == "succeeded", done
        with app.app_context():
            tags = [r[0] for r in db.session.execute(sa.text("SELECT tag FROM rows"))]
            assert tags == ["kept"]
        # No session is left behind by the items (each was removed with its app context).
        assert db.session.registry.registry == {}  # type: ignore[attr-defined]
    finally:
        runner.close(app, grace=0)


def save_row(tag: str, commit: bool) -> str:
    """A task using the app's Flask-SQLAlchemy session (test_flask_sqlalchemy_...)."""
    from flask import current_app
    db = current_app.extensions["sqlalchemy"]
    db.session.execute(current_app.extensions["test_rows"].insert().values(tag=tag))
    if commit:
        db.session.commit()
    return tag


def test_errors_carry_the_api_codes(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = app.test_client()
    runner = embed_app.runner
    with app.app_context():
        with pytest.raises(errors.InvalidSubmission) as bad:
            runner.submit("greet", {"nam": "x"})
        with pytest.raises(errors.InvalidSubmission) as unknown_option:
            runner.submit("greet", {"name": "x"}, colour="red")
        with pytest.raises(errors.InvalidSubmission) as unknown_task:
            runner.submit("nope")
        with pytest.raises(errors.NotFound) as missing:
            runner.get("feedbeef")
        job = runner.submit("greet", {"name": "x"}, key="k1")
        assert runner.submit("greet", {"name": "x"}, key="k1")["id"] == job["id"]
        with pytest.raises(errors.KeyConflict):
            runner.submit("greet", {"name": "y"}, key="k1")
    # The same submission over the mounted API: the same code, as a 422.
    api = client.post(JOBS, json={"task": "greet", "params": {"nam": "x"}})
    assert api.status_code == 422
    assert api.get_json()["error"]["code"] == bad.value.code == "invalid_submission"
    assert api.get_json()["error"]["details"] == bad.value.details
    assert set(bad.value.fields) == {"params.nam", "params.name"}
    assert "colour" in unknown_option.value.fields
    assert unknown_task.value.code == "invalid_submission"
    assert missing.value.code == "not_found"
    wait_mounted_job(client, job["id"])
    with app.app_context(), pytest.raises(errors.JobFinished) as finished:
        runner.cancel(job["id"])
    assert finished.value.code == "job_finished"
    # The app's route decides how to answer them.
    r = client.post("/task", json={"task": "greet", "params": {"name": 3}})
    assert r.status_code == 422 and r.get_json()["code"] == "invalid_submission"


def test_cancel_from_the_app(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_workers=1)
    with app.app_context():
        job = embed_app.runner.submit("mark", items=[{"tag": str(i), "sleep": 0.5}
                                                     for i in range(4)])
        cancelled = embed_app.runner.cancel(job["id"])
    assert cancelled["state"] in ("cancelled", "running")
    done = wait_mounted_job(app.test_client(), job["id"])
    assert done["state"] == "cancelled"


def test_config_comes_from_the_app_with_the_files_messages(tmp_path: Path) -> None:
    def app_with(**config: Any) -> Flask:
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config.update(config)
        return app

    with pytest.raises(errors.ConfigError) as unknown:
        BulkRunner(app_with(BULKRUNNER={"store": {"paht": "x.db"}}))
    assert 'app.config["BULKRUNNER"]' in unknown.value.message
    assert "store.paht" in unknown.value.message and "path" in unknown.value.message
    with pytest.raises(errors.ConfigError) as wrong_type:
        BulkRunner(app_with(BULKRUNNER={"executor": {"max_workers": "four"}}))
    assert "executor.max_workers" in wrong_type.value.message
    with pytest.raises(errors.ConfigError) as not_a_dict:
        BulkRunner(app_with(BULKRUNNER="jobs.db"))
    assert "dict" in not_a_dict.value.message
    toml = toml_config(tmp_path)
    with pytest.raises(errors.ConfigError) as both:
        BulkRunner(app_with(BULKRUNNER={}, BULKRUNNER_CONFIG=str(toml)))
    assert "not both" in both.value.message
    with pytest.raises(errors.ConfigError) as missing:
        BulkRunner(app_with(BULKRUNNER_CONFIG=str(tmp_path / "nope.toml")))
    assert "nope.toml" in missing.value.message

    # A TOML file by path; and a relative store path goes in the instance folder.
    from_file = app_with(BULKRUNNER_CONFIG=str(toml))
    runner = BulkRunner(from_file)
    try:
        assert runner._mount(from_file).cfg.store.path == str(tmp_path / "test.db")
        with from_file.app_context():
            assert runner.submit("add", {"a": 1})["task"] == "add"
    finally:
        runner.close(from_file, grace=0)
    relative = app_with(BULKRUNNER={"store": {"path": "jobs.db"}})
    runner = BulkRunner(relative)
    try:
        assert runner._mount(relative).cfg.store.path == str(tmp_path / "instance" / "jobs.db")
        with relative.app_context():
            assert runner.submit("echo", {"value": 1})["state"] == "queued"
        assert (tmp_path / "instance" / "jobs.db").exists()
    finally:
        runner.close(relative, grace=0)


def test_the_factory_pattern_and_calls_outside_the_app(tmp_path: Path) -> None:
    runner = BulkRunner(url_prefix="/jobs/")
    app = Flask(__name__)
    app.config["BULKRUNNER"] = {"store": {"path": str(tmp_path / "jobs.db")}}
    runner.init_app(app)
    try:
        with pytest.raises(RuntimeError, match="app_context"):
            runner.submit("echo")
        with pytest.raises(RuntimeError, match="set up already"):
            runner.init_app(app)
        client = app.test_client()
        r = client.post("/jobs/api/v1/jobs", json={"task": "echo", "params": {"value": 2}})
        assert r.status_code == 202, r.get_data(as_text=True)
        assert r.headers["Location"] == f"/api/v1/jobs/{r.get_json()['id']}"
        assert client.get("/jobs/healthz").get_json()["dispatching"] is True
        other = Flask(__name__)
        with other.app_context(), pytest.raises(RuntimeError, match="no bulkrunner"):
            runner.get("x")
    finally:
        runner.close(app, grace=0)


def test_the_mount_leaves_the_rest_of_the_app_alone(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "base.html").write_text("HOST BASE {% block main %}{% endblock %}")
    (templates / "home.html").write_text('{% extends "base.html" %}{% block main %}home'
                                         '{% endblock %}')
    app = Flask(__name__, template_folder=str(templates))
    app.config["BULKRUNNER"] = {"store": {"path": str(tmp_path / "jobs.db")}}
    # The app's own blueprints may use the names of the server's ("api", "web").
    own_api, own_web = Blueprint("api", __name__), Blueprint("web", __name__)

    @own_api.get("/mine")
    def mine() -> str:
        return "mine"

    @own_web.get("/page")
    def page() -> str:
        from flask import render_template
        return render_template("home.html")

    @app.get("/boom")
    def boom() -> str:
        raise ValueError("the app's own error")

    app.register_blueprint(own_api, url_prefix="/api")
    app.register_blueprint(own_web)
    runner = BulkRunner(app)
    try:
        client = app.test_client()
        assert client.get("/api/mine").get_data(as_text=True) == "mine"
        assert client.get("/page").get_data(as_text=True) == "HOST BASE home"
        host_404 = client.get("/nothing-here")
        assert host_404.status_code == 404 and not host_404.is_json
        assert "Content-Security-Policy" not in client.get("/page").headers
        app.config["PROPAGATE_EXCEPTIONS"] = False
        assert not client.get("/boom").is_json  # the app's errors stay the app's
        # The page is ours, with our base template, scripts and paths under the prefix.
        page_html = client.get(f"{MOUNT}/")
        assert page_html.status_code == 200
        text = page_html.get_data(as_text=True)
        assert "HOST BASE" not in text
        assert '<meta name="bulkrunner-root" content="/bulkrunner">' in text
        assert 'href="/bulkrunner/tasks"' in text and "/bulkrunner/assets/common.js" in text
        assert "Content-Security-Policy" in page_html.headers
        with client.get(f"{MOUNT}/assets/common.js") as script:
            assert script.status_code == 200
        # The server's own errors keep the API's shape under the prefix.
        missing = client.get(f"{JOBS}/feedbeef")
        assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
        assert client.get(f"{MOUNT}/openapi.json").status_code == 200
        metrics = client.get(f"{MOUNT}/metrics").get_data(as_text=True)
        assert "bulkrunner_queue_depth" in metrics
        health = client.get(f"{MOUNT}/healthz").get_json()
        assert health["status"] == "ok" and health["dispatching"] is True
        # The host name is the app's business: no loopback-only guard on the mount.
        assert client.get(f"{MOUNT}/healthz", headers={"Host": "jobs.example.com"}
                          ).status_code == 200
        # A state change from another web site is refused, as on the server.
        cross = client.post(JOBS, json={"task": "echo"},
                            headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403 and cross.get_json()["error"]["code"] == "cross_origin"
    finally:
        runner.close(app, grace=0)


def test_token_rules_apply_to_the_mount_only(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config["BULKRUNNER"] = {"store": {"path": str(tmp_path / "jobs.db")},
                                "server": {"token": "s3cret"}}

    @app.get("/")
    def home() -> str:
        return "open"

    runner = BulkRunner(app)
    try:
        client = app.test_client()
        assert client.get("/").get_data(as_text=True) == "open"
        refused = client.get(JOBS)
        assert refused.status_code == 401
        assert refused.get_json()["error"]["code"] == "unauthorized"
        assert client.get(JOBS, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get(f"{MOUNT}/healthz").status_code == 200
        login = client.get(f"{MOUNT}/")
        assert login.status_code == 302
        assert login.headers["Location"].startswith(f"{MOUNT}/login")
        # In-process calls are the app's own: no token.
        with app.app_context():
            assert runner.submit("echo", {"value": 1})["submitted_by"] is None
    finally:
        runner.close(app, grace=0)


def test_the_apps_own_login_can_guard_the_mount(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config["BULKRUNNER"] = {"store": {"path": str(tmp_path / "jobs.db")}}

    @app.before_request
    def staff_only() -> None:  # as the README shows
        if "bulkrunner" in request.blueprints and request.headers.get("X-User") != "staff":
            abort(403)

    runner = BulkRunner(app)
    try:
        client = app.test_client()
        assert client.get(JOBS).status_code == 403
        assert client.get(f"{MOUNT}/").status_code == 403
        assert client.get(JOBS, headers={"X-User": "staff"}).status_code == 200
    finally:
        runner.close(app, grace=0)


def test_a_task_without_the_thread_executor_runs_outside_the_app(
        make_app: Callable[..., Flask]) -> None:
    app = make_app(executor="process", max_workers=1)
    client = app.test_client()
    r = client.post("/task", json={"task": "greet", "params": {"name": "x"}})
    job = wait_mounted_job(client, r.get_json()["id"], timeout=60)
    assert job["state"] == "failed"
    assert "application context" in job["error"]["message"]


# ------------------------------------------------------------------ under waitress
def waitress_app(tmp_path: Path) -> AppProcess:
    env = child_env({"EMBED_DB": str(tmp_path / "jobs.db"),
                     "EMBED_MARKS": str(tmp_path / "marks")})
    argv = [sys.executable, "-m", "waitress", "--listen=127.0.0.1:0", "--threads=8",
            "--call", "tests.embed_app:from_env"]
    return AppProcess(argv, tmp_path, env)


@pytest.mark.slow
def test_under_waitress_a_kill_9_loses_nothing(tmp_path: Path) -> None:
    app = waitress_app(tmp_path).start()
    try:
        assert app.get(f"{MOUNT}/healthz").json()["dispatching"] is True
        ids = submit_marks(app, [f"t{i}" for i in range(20)], sleep=0.2)
        listed = app.get(JOBS, params={"limit": 100}).json()["jobs"]
        assert {j["id"] for j in listed} == set(ids.values())
        wait_for(lambda: sum(read_marks(tmp_path / "marks")[1].values()) >= 3, 30,
                 "a few jobs finish")
    finally:
        app.kill()
    starts, ends, _ = read_marks(tmp_path / "marks")
    assert sum(ends.values()) < 20, "everything finished before the kill"
    again = waitress_app(tmp_path).start()
    try:
        # Its first request starts the service: it takes the lease (the killed process is
        # gone) and re-queues what was running.
        wait_all_succeeded(again, ids, timeout=60)
    finally:
        again.kill()
    starts, ends, _ = read_marks(tmp_path / "marks")
    assert set(ends) == set(ids), ends
    # Only items the killed process had running ran again (on a worker, or ended but not
    # yet recorded: at least once, so such an item ends twice): a few, at most about twice
    # the 4 workers.
    assert all(n <= 2 for n in ends.values()), ends
    assert sum(ends.values()) - len(ids) <= 4, ends
    assert sum(starts.values()) - len(ids) <= 8, starts

