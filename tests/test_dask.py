"""The Dask executor against real processes: a `dask scheduler`, `dask worker`s on loopback
and a `bulkrunner serve` pointed at them (issue 7).

Workers run with ``--no-nanny`` so that SIGKILL removes a worker for good (a nanny would
restart it), and with PYTHONPATH at the repository root so ``tests.sample_tasks`` imports.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkrunner.client import Client
from bulkrunner.config import load_config
from bulkrunner.errors import ConfigError
from tests.conftest import ROOT, SAMPLE_TASKS, ServerProcess, toml_config, wait_for

HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason='needs the dask extra: '
                                'pip install "bulkrunner[dask]"')


class DaskProcesses:
    """A `dask scheduler` and `dask worker`s as subprocesses on loopback, on free ports."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}  # address -> process
        self.address = ""
        self._n = 0

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        self._n += 1
        log_path = self.tmp / f"{name}-{self._n}.log"
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=self.tmp,
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return proc, log_path

    @staticmethod
    def _await_line(proc: subprocess.Popen[bytes], log_path: Path, pattern: str,
                    what: str) -> str:
        def seen() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited with {proc.returncode}:\n"
                                     f"{log_path.read_text()}")
            m = re.search(pattern, log_path.read_text())
            return m.group(1) if m else None
        found: str = wait_for(seen, 60, f"{what} did not start; log {log_path}", 0.1)
        return found

    def start_scheduler(self, port: int = 0) -> str:
        """Start the scheduler (port 0: a free one); returns its address."""
        proc, log = self._spawn("scheduler", [
            "scheduler", "--host", "127.0.0.1", "--port", str(port),
            "--dashboard-address", "127.0.0.1:0"])
        self.scheduler = proc
        self.address = self._await_line(proc, log, r"Scheduler at:\s+(tcp://\S+)",
                                         "dask scheduler")
        return self.address

    def start_worker(self) -> str:
        """Start a one-thread worker; returns its address once it registered."""
        proc, log = self._spawn("worker", [
            "worker", self.address, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1",
            "--dashboard-address", "127.0.0.1:0", "--local-directory", str(self.tmp)])
        addr = self._await_line(proc, log, r"Start worker at:\s+(tcp://\S+)", "dask worker")
        self._await_line(proc, log, r"(Registered to)", "dask worker registration")
        self.workers[addr] = proc
        return addr

    def kill_worker(self, address: str) -> None:
        proc = self.workers.pop(address)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait(10)

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        self.workers.clear()


@pytest.fixture
def dask_procs(tmp_path: Path) -> Iterator[DaskProcesses]:
    procs = DaskProcesses(tmp_path)
    yield procs
    procs.stop()


def chatty(n: int = 3) -> int:
    """Print ``n`` lines and log one warning (a task for the item-log test)."""
    for i in range(n):
        print(f"chatty line {i}")
    logging.getLogger("chatty").warning("chatty warning")
    return n


TASKS = {**SAMPLE_TASKS, "chatty": "tests.test_dask:chatty"}


def dask_config(tmp: Path, address: str, max_workers: int = 4, jobs: str = "") -> Path:
    """A test config for the dask executor at ``address`` ("" = local cluster)."""
    path = toml_config(tmp, executor="dask", max_workers=max_workers, jobs=jobs, tasks=TASKS)
    text = path.read_text().replace(f"max_workers = {max_workers}\n",
                                    f'max_workers = {max_workers}\naddress = "{address}"\n')
    path.write_text(text)
    return path


def all_items(c: Client, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = c.items(job_id, limit=10000)["items"]
    return items


def wait_job(c: Client, job_id: str, timeout: float) -> dict[str, Any]:
    try:
        return c.wait(job_id, timeout=timeout)
    except TimeoutError as e:
        raise AssertionError(f"{e}: {c.job(job_id)['items']}") from None


def healthz(c: Client) -> dict[str, Any]:
    return c.health()


def healthz_status(url: str) -> int:
    """The HTTP status of /healthz."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


# ---------------------------------------------------------------------- without a cluster
def test_dask_without_distributed_is_a_config_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkrunner.executors import make_executor

    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    cfg = load_config(toml_config(tmp_path, executor="dask"))
    with pytest.raises(ConfigError, match=r'pip install "bulkrunner\[dask\]"'):
        make_executor(cfg)


def test_serve_without_distributed_exits_2_naming_the_extra(tmp_path: Path) -> None:
    # A package named distributed that cannot be imported, first on the path.
    fake = tmp_path / "fake" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "bulkrunner", "--config",
                          str(toml_config(tmp_path, executor="dask")), "serve"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert 'pip install "bulkrunner[dask]"' in out.stderr
    assert "executor.type" in out.stderr


def test_nothing_imports_dask_unless_chosen() -> None:
    code = ("import sys, bulkrunner.server.run, bulkrunner.server.app, bulkrunner.server.service, "
            "bulkrunner.server.dispatcher, bulkrunner.executors, bulkrunner.executors.process; "
            "print(','.join(m for m in ('dask', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"imported without being chosen: {out.stdout.strip()}"


# ---------------------------------------------------------------------- a real cluster
Serve = Callable[..., ServerProcess]


@needs_dask
@pytest.mark.slow
def test_bulk_spreads_over_workers_and_survives_a_killed_worker(
        tmp_path: Path, dask_procs: DaskProcesses, serve: Serve) -> None:
    address = dask_procs.start_scheduler()
    w1, w2 = dask_procs.start_worker(), dask_procs.start_worker()
    server = serve(dask_config(tmp_path, address, max_workers=4))
    with Client(server.url, timeout=30) as c:
        h = wait_for(lambda: (r := healthz(c))["status"] == "ok" and r, 30,
                     "server never saw both workers")
        assert h["executor"]["type"] == "dask" and "2 Dask workers" in h["executor"]["detail"]
        assert h["workers"] == 2  # the cluster's threads (1 each), not max_workers (4)

        # 200 items end succeeded, spread over both workers, each item run once.
        runs = tmp_path / "runs.txt"
        job = c.submit("record", {"path": str(runs), "delay": 0.01},
                       items=[{"i": i} for i in range(200)])
        done = wait_job(c, job["id"], 120)
        assert done["state"] == "succeeded", done
        items = all_items(c, job["id"])
        assert len(items) == 200
        by_worker: dict[str, int] = {}
        for it in items:
            by_worker[it["worker"]] = by_worker.get(it["worker"], 0) + 1
        assert set(by_worker) == {w1, w2}, by_worker
        assert sorted(int(x) for x in runs.read_text().split()) == list(range(200))

        # Kill one worker mid-run: its item is re-run by Dask on the other, the bulk
        # still ends succeeded and every item ran (at least once).
        runs2 = tmp_path / "runs2.txt"
        job = c.submit("record", {"path": str(runs2), "delay": 0.05},
                       items=[{"i": i} for i in range(200)])
        wait_for(lambda: c.job(job["id"])["items"]["succeeded"] >= 30, 60,
                 "the second bulk did not get going")
        dask_procs.kill_worker(w1)
        done = wait_job(c, job["id"], 120)
        assert done["state"] == "succeeded", done
        items = all_items(c, job["id"])
        assert all(it["state"] == "succeeded" and it["attempts"] == 1 for it in items)
        assert {it["worker"] for it in items} == {w1, w2}
        late = [it for it in items if it["index"] >= 190]
        assert {it["worker"] for it in late} == {w2}, "items after the kill ran on w2 only"
        ran = {int(x) for x in runs2.read_text().split()}
        assert ran == set(range(200))
        h = healthz(c)
        assert h["status"] == "ok" and "1 Dask workers" in h["executor"]["detail"], h


@needs_dask
@pytest.mark.slow
def test_scheduler_lost_then_back(tmp_path: Path, dask_procs: DaskProcesses,
                                  serve: Serve) -> None:
    address = dask_procs.start_scheduler()
    dask_procs.start_worker()
    dask_procs.start_worker()
    server = serve(dask_config(tmp_path, address, max_workers=2))
    with Client(server.url, timeout=30) as c:
        wait_for(lambda: healthz(c)["status"] == "ok", 30, "server never became healthy")
        job = c.submit("slow", {"seconds": 0.5}, items=[{} for _ in range(10)])
        wait_for(lambda: c.job(job["id"])["items"]["running"] > 0, 30, "nothing started")

        # Scheduler gone: /healthz is 503 and says why; the server stays up and accepts.
        dask_procs.kill_scheduler()
        h = wait_for(lambda: (r := healthz(c))["status"] != "ok" and r, 30,
                     "/healthz kept saying ok without a scheduler")
        assert h["status"] == "executor_unavailable", h
        assert "scheduler unreachable" in h["executor"]["detail"], h
        assert healthz_status(server.url) == 503
        assert server.proc is not None and server.proc.poll() is None
        later = c.submit("add", {"a": 1}, items=[{"b": i} for i in range(5)])
        assert later["state"] == "queued"
        time.sleep(1)
        assert c.job(later["id"])["items"]["queued"] == 5, "claimed with no scheduler"
        # Past the client's own reconnect window it closes; the server builds a new one.
        wait_for(lambda: "client connecting" not in healthz(c)["executor"]["detail"], 60,
                 "the Dask client never gave up reconnecting by itself")
        assert healthz_status(server.url) == 503
        # Dask workers exit when their scheduler goes (a supervisor would restart them).
        for addr, proc in list(dask_procs.workers.items()):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {addr} did not exit within 30 s of losing "
                                     "its scheduler") from None
            dask_procs.workers.pop(addr)

        # Back on the same address, with new workers: the server reconnects and resumes;
        # items interrupted by the loss were re-queued without spending an attempt.
        dask_procs.start_scheduler(port=int(address.rsplit(":", 1)[1]))
        dask_procs.start_worker()
        dask_procs.start_worker()
        wait_for(lambda: healthz(c)["status"] == "ok", 60, "server did not reconnect")
        for j in (job, later):
            done = wait_job(c, j["id"], 60)
            assert done["state"] == "succeeded", done
        assert all(it["attempts"] == 1 for it in all_items(c, job["id"]))
    assert "Dask executor unavailable" in server.log()


@needs_dask
@pytest.mark.slow
def test_local_cluster_worker_died_timeout_and_stop(tmp_path: Path, serve: Serve) -> None:
    # One worker process, so the timeout case shows the worker was freed cooperatively;
    # Dask gives up on an item that kills its worker after 1 re-run instead of 3.
    server = serve(dask_config(tmp_path, "", max_workers=1),
                   env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"})
    with Client(server.url, timeout=30) as c:
        h = wait_for(lambda: (r := healthz(c))["status"] == "ok" and r, 60,
                     "local cluster never became healthy")
        assert "1 Dask workers" in h["executor"]["detail"], h

        job = c.submit("add", {"a": 1}, items=[{"b": i} for i in range(20)])
        assert wait_job(c, job["id"], 60)["state"] == "succeeded"
        workers = {it["worker"] for it in all_items(c, job["id"])}
        assert len(workers) == 1 and next(iter(workers)).startswith("tcp://127.0.0.1:")

        # What a task prints and logs on a Dask worker reaches the item's log, and
        # progress reaches the job, both through the scheduler as Dask events.
        job = c.submit("chatty", {"n": 3})
        assert wait_job(c, job["id"], 30)["state"] == "succeeded"
        text = c.item_log(job["id"], 0).data.decode()
        assert all(f"chatty line {i}" in text for i in range(3)), text
        assert "chatty warning" in text, text
        job = c.submit("progress", {"steps": 10, "delay": 0.15})
        wait_for(lambda: (c.job(job["id"])["message"] or "").startswith("step "), 30,
                 "no progress message from the Dask worker")
        assert wait_job(c, job["id"], 30)["state"] == "succeeded"

        # An item that kills its worker every time: KilledWorker -> WorkerDied, an attempt.
        job = c.submit("sigkill_self", max_attempts=1)
        done = wait_job(c, job["id"], 90)
        assert done["state"] == "failed", done
        assert done["error"]["type"] == "WorkerDied", done["error"]
        assert "Dask worker running this item died" in done["error"]["message"]

        # A timeout stops a cooperative task on the worker, so the next item runs soon.
        slow = c.submit("slow", {"seconds": 60}, timeout=1)
        done = wait_job(c, slow["id"], 60)
        assert done["state"] == "failed" and done["error"]["type"] == "TimeoutError", done
        t0 = time.monotonic()
        quick = c.submit("add", {"a": 2})
        assert wait_job(c, quick["id"], 30)["result"] == 3
        assert time.monotonic() - t0 < 10, "the timed-out task kept the worker busy"

    server.signal(signal.SIGTERM)
    assert server.wait(60) == 0
