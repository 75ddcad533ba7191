"""Shared fixtures and helpers: configs in a temp dir, an in-process app, a real server
process, the real CLI in a fresh interpreter, and waiting for a job (never a fixed sleep:
``wait_for`` polls a condition until a timeout, and fails with a message)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from flask.testing import FlaskClient
    from werkzeug.test import TestResponse

    from bulkrunner.client import Client
    from bulkrunner.runtime import WorkUnit
    from bulkrunner.store import Store

ROOT = Path(__file__).resolve().parent.parent
JOBS = "/api/v1/jobs"
FINISHED = ("succeeded", "failed", "cancelled")
#: What a developer's shell may hold that would point the CLI or a server elsewhere.
ENV_VARS = ("BULKRUNNER_URL", "BULKRUNNER_TOKEN", "BULKRUNNER_CONFIG")
SAMPLE_TASKS = {
    "add": "tests.sample_tasks:add", "typed": "tests.sample_tasks:typed",
    "square": "tests.sample_tasks:square", "noop": "tests.sample_tasks:noop",
    "slow": "tests.sample_tasks:slow", "stubborn": "tests.sample_tasks:stubborn",
    "die": "tests.sample_tasks:die", "sigkill_self": "tests.sample_tasks:sigkill_self",
    "flaky": "tests.sample_tasks:flaky", "progress": "tests.sample_tasks:progress",
    "record": "tests.sample_tasks:record", "big": "tests.sample_tasks:big",
    "tally": "tests.sample_tasks:tally",
}
LOG_TASKS = {
    **SAMPLE_TASKS, "chatter": "tests.log_tasks:chatter", "ticker": "tests.log_tasks:ticker",
    "flood": "tests.log_tasks:flood", "thread_print": "tests.log_tasks:thread_print",
    "print_then_fail": "tests.log_tasks:print_then_fail",
    "odd_text": "tests.log_tasks:odd_text", "print_until": "tests.log_tasks:print_until",
}


def toml_config(tmp: Path, *, executor: str = "thread", max_workers: int = 2,
                extra: str = "", tasks: dict[str, str] | None = None,
                jobs: str = "", server: str = "", shutdown_grace: float = 5,
                retry_backoff: float = 0.05) -> Path:
    """Write a config file in ``tmp`` and return its path."""
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", f"shutdown_grace = {shutdown_grace}",
             server, "[executor]", f'type = "{executor}"', f"max_workers = {max_workers}",
             "[store]", 'path = "test.db"', "[jobs]", f"retry_backoff = {retry_backoff}", jobs,
             "[tasks]"]
    for name, target in (tasks or SAMPLE_TASKS).items():
        lines.append(f'{name} = "{target}"')
    lines.append(extra)
    path = tmp / "bulkrunner.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(pred: Callable[[], Any], timeout: float, message: str,
             interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; fail with ``message`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s: {message} (last: {last!r})")


def wait_job_state(fetch: Callable[[], dict[str, Any]], timeout: float, what: str,
                   states: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    """Poll ``fetch()`` (a job, as the API shows it) until its state is one of ``states``;
    return that job. ``what`` names the job in the timeout's message."""
    def reached() -> dict[str, Any] | None:
        job = fetch()
        return job if job["state"] in states else None
    job: dict[str, Any] = wait_for(reached, timeout, f"{what} to reach {'/'.join(states)}")
    return job


def wait_job(c: Client, job_id: str, timeout: float,
             states: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    """Poll a real server (through ``c``) until the job is in one of ``states``."""
    return wait_job_state(lambda: c.job(job_id), timeout, f"job {job_id}", states)


def all_items(c: Client, job_id: str) -> list[dict[str, Any]]:
    """Every item of a job on a real server, page after page."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = c.items(job_id, limit=10000, after=after)
        items += page["items"]
        after = page["next"]
        if after is None:
            return items


def wait_app_job(client: FlaskClient, ident: str, timeout: float = 20,
                 states: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    """Poll an in-process app (its Flask test client) until the job is in ``states``."""
    def fetch() -> dict[str, Any]:
        r = client.get(f"{JOBS}/{ident}")
        assert r.status_code == 200, r.get_data(as_text=True)
        job: dict[str, Any] = r.get_json()
        return job
    return wait_job_state(fetch, timeout, f"job {ident}", states)


def work_unit(target: str, params: dict[str, Any] | None = None, **kw: Any) -> WorkUnit:
    """One attempt of item 0 of job "j" (claim 1, no timeout), ``kw`` overriding fields."""
    from bulkrunner.runtime import WorkUnit

    base: dict[str, Any] = dict(job_id="j", job_seq=1, index=0, claim=1, task="t",
                                target=target, params=params or {}, timeout=0.0,
                                deadline=None)
    return WorkUnit(**{**base, **kw})


def free_port() -> int:
    """A loopback port nothing listens on when asked (another process may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: this one's, without $BULKRUNNER_URL, _TOKEN
    and _CONFIG, with PYTHONPATH at the repository root (``tests.*`` tasks import)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return {**env, "PYTHONPATH": str(ROOT), **(extra or {})}


def cli_command(*args: str, url: str | None = None) -> list[str]:
    """The argv of the real ``bulkrunner`` CLI in a fresh interpreter."""
    return [sys.executable, "-m", "bulkrunner", *(["--url", url] if url else []), *args]


def run_cli(*args: str, url: str | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the real CLI to its end and capture its output. It runs in ``cwd``, by default
    an empty temp dir made for it (never the repository: no ./bulkrunner.toml is read
    there, nothing is written there); ``env`` defaults to ``child_env()``."""
    if cwd is None:
        with tempfile.TemporaryDirectory(prefix="bulkrunner-cli-") as empty:
            return run_cli(*args, url=url, cwd=Path(empty), env=env, timeout=timeout)
    return subprocess.run(cli_command(*args, url=url), cwd=cwd,
                          env=child_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)


class ServerProcess:
    """A real ``bulkrunner serve`` subprocess on a free port. As a context manager it is
    started on entry and killed on exit (``with ServerProcess(cfg) as srv: yield srv`` is a
    module-scoped server fixture)."""

    def __init__(self, config: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.args = args or []
        self.env = child_env(env)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log_path = config.parent / f"server-{int(time.time() * 1000)}.log"

    def start(self, timeout: float = 30) -> ServerProcess:
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bulkrunner", "--config", str(self.config), "serve",
             *self.args], cwd=self.config.parent, env=self.env, stdout=self._log,
            stderr=subprocess.STDOUT, text=True)

        def ready() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()}")
            m = re.search(r"serving on (http://\S+)", self.log_path.read_text())
            return m.group(1) if m else None

        self.url = wait_for(ready, timeout, f"server did not start; log:\n{self.log_path}")
        return self

    def __enter__(self) -> ServerProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit within {timeout} s; log:\n"
                                 f"{self.log()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


@pytest.fixture
def isolated_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The test runs in ``tmp_path``, without $BULKRUNNER_URL, _TOKEN or _CONFIG: an
    in-process CLI reads no stray ./bulkrunner.toml and writes nothing into the repository."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store in ``tmp_path``, closed after."""
    from bulkrunner.store import Store

    s = Store(str(tmp_path / "t.db"))
    yield s
    s.close()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return toml_config(tmp_path)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``serve(config_path, args=[...])`` starts a server; all are killed after."""
    started: list[ServerProcess] = []

    def start(config: Path | None = None, args: list[str] | None = None,
              env: dict[str, str] | None = None) -> ServerProcess:
        s = ServerProcess(config or toml_config(tmp_path), args, env).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: an in-process Flask app over a temp database; its service is closed after."""
    from bulkrunner.config import load_config
    from bulkrunner.server.app import create_app

    apps: list[Any] = []

    def make(**kwargs: Any) -> Any:
        cfg = load_config(toml_config(tmp_path, **kwargs))
        app = create_app(cfg)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["bulkrunner"].close(grace=0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through Playwright, one per test module (skips with a reason
    when it or Playwright is missing; see tests/browser.py)."""
    from tests.browser import launch

    yield from launch()


@pytest.fixture
def session(browser: Any, serve: Any, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``session(max_workers=..., server=...)`` starts a server and opens a page."""
    from tests.browser import session_factory

    yield from session_factory(browser, serve, tmp_path)


def assert_error(r: TestResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the status and the API's error body; return the ``error`` object."""
    text = r.get_data(as_text=True)
    assert r.status_code == status, text
    assert r.mimetype == "application/json", r.mimetype
    body = json.loads(text)
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", err["code"]), err["code"]
    if code is not None:
        assert err["code"] == code, err
    assert isinstance(err["details"], dict), err
    msg = err["message"]
    # A useful sentence: several words, not a bare status name or a Python repr.
    assert isinstance(msg, str) and len(msg.split()) >= 4, msg
    assert "Traceback" not in msg and "<" not in msg[:1], msg
    return err
