"""Shared fixtures: configs in a temp dir, an in-process app, and a real server process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TASKS = {
    "add": "tests.sample_tasks:add", "typed": "tests.sample_tasks:typed",
    "square": "tests.sample_tasks:square", "noop": "tests.sample_tasks:noop",
    "slow": "tests.sample_tasks:slow", "stubborn": "tests.sample_tasks:stubborn",
    "die": "tests.sample_tasks:die", "sigkill_self": "tests.sample_tasks:sigkill_self",
    "flaky": "tests.sample_tasks:flaky", "progress": "tests.sample_tasks:progress",
    "record": "tests.sample_tasks:record", "big": "tests.sample_tasks:big",
    "tally": "tests.sample_tasks:tally",
}


def toml_config(tmp: Path, *, executor: str = "thread", max_workers: int = 2,
                extra: str = "", tasks: dict[str, str] | None = None,
                jobs: str = "", server: str = "") -> Path:
    """Write a config file in ``tmp`` and return its path."""
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", "shutdown_grace = 5", server,
             "[executor]", f'type = "{executor}"', f"max_workers = {max_workers}",
             "[store]", 'path = "test.db"', "[jobs]", "retry_backoff = 0.05", jobs, "[tasks]"]
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


class ServerProcess:
    """A real ``bulkrunner serve`` subprocess on a free port."""

    def __init__(self, config: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.args = args or []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.env.pop("BULKRUNNER_URL", None)
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
