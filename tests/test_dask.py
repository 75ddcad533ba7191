"""The Dask executor against real processes: a `dask scheduler`, `dask worker`s on loopback
and a `bulkrunner serve` pointed at them (issue 7).

Workers run with ``--no-nanny`` so that SIGKILL removes a worker for good (a nanny would
restart it), and with PYTHONPATH at the repository root so ``tests.sample_tasks`` imports.
"""

from __future__ import annotations

import importlib.util
import json
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
        self.tls: list[str] = []  # extra options for both, e.g. --protocol tls --tls-cert
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
            "--dashboard-address", "127.0.0.1:0", *self.tls])
        self.scheduler = proc
        self.address = self._await_line(proc, log, r"Scheduler at:\s+((?:tcp|tls)://\S+)",
                                         "dask scheduler")
        return self.address

    def start_worker(self) -> str:
        """Start a one-thread worker; returns its address once it registered."""
        proc, log = self._spawn("worker", [
            "worker", self.address, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1",
            "--dashboard-address", "127.0.0.1:0", "--local-directory", str(self.tmp),
            *self.tls])
        addr = self._await_line(proc, log, r"Start worker at:\s+((?:tcp|tls)://\S+)",
                                "dask worker")
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


def profiling() -> list[object]:
    """This worker's profiler switch, tick and system monitor intervals."""
    import dask.config

    return [dask.config.get(k) for k in ("distributed.worker.profile.enabled",
                                         "distributed.admin.tick.interval",
                                         "distributed.admin.system-monitor.interval")]


TASKS = {**SAMPLE_TASKS, "chatty": "tests.test_dask:chatty",
         "profiling": "tests.test_dask:profiling"}


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


# Run by `python -c` as another local user would: try to run os.getpid on the scheduler
# (run_on_scheduler) or on a worker (its "run" handler), and print one JSON line saying
# whether it ran or how it failed. argv: how to connect, the address.
ATTACK = """
import asyncio, json, os, sys, time
from distributed import Client
from distributed.core import rpc
from distributed.protocol import pickle
from distributed.security import Security

how, address = sys.argv[1], sys.argv[2]
security = Security.temporary() if how.endswith("own-cert") else None
if how.endswith("tcp"):
    address = address.replace("tls://", "tcp://")

async def on_worker():
    args = (security or Security()).get_connection_args("client")
    async with rpc(address, timeout=5, connection_args=args) as r:
        return await r.run(function=pickle.dumps(os.getpid))

t = time.monotonic()
try:
    if how.startswith("scheduler"):
        with Client(address, timeout=5, set_as_default=False, security=security) as c:
            out = {"ran": repr(c.run_on_scheduler(os.getpid))}
    else:
        out = {"ran": repr(asyncio.run(asyncio.wait_for(on_worker(), 20)))}
except Exception as e:
    out = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps({"seconds": time.monotonic() - t, **out}), flush=True)
os._exit(0)  # a Client that failed to start holds up a normal exit for 10 s
"""
ATTACKS = {  # how -> the error that shows the comm layer refused it
    "scheduler-no-cert": r"^TypeError: TLS expects a `ssl_context`",
    "scheduler-tcp": r"^CommClosedError: .*Connection reset",
    "scheduler-own-cert": r"^FatalCommClosedError: TLS certificate does not match",
    "worker-tcp": r"^CommClosedError: .*before comm was established",
    "worker-own-cert": r"^FatalCommClosedError: .*before comm was established",
}


def attack(how: str, address: str) -> subprocess.Popen[str]:
    """Start one ATTACK from another process (its result: :func:`attack_result`)."""
    return subprocess.Popen([sys.executable, "-c", ATTACK, how, address], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def attack_result(how: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"attack {how} did not finish within 60 s") from None
    assert proc.returncode == 0, f"attack {how} exited {proc.returncode}:\n{err}"
    lines = out.strip().splitlines()
    assert lines, f"attack {how} printed nothing:\n{err}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


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
        # Past the client's own reconnect window it closes; the server builds a new one.
        wait_for(lambda: "client connecting" not in healthz(c)["executor"]["detail"], 60,
                 "the Dask client never gave up reconnecting by itself")
        assert healthz_status(server.url) == 503
        # All that while (about 10 s of dispatcher turns) nothing was claimed.
        assert c.job(later["id"])["items"]["queued"] == 5, "claimed with no scheduler"
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
                   env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
                        "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "True"})
    with Client(server.url, timeout=30) as c:
        h = wait_for(lambda: (r := healthz(c))["status"] == "ok" and r, 60,
                     "local cluster never became healthy")
        assert "1 Dask workers" in h["executor"]["detail"], h

        job = c.submit("add", {"a": 1}, items=[{"b": i} for i in range(20)])
        assert wait_job(c, job["id"], 60)["state"] == "succeeded"
        workers = {it["worker"] for it in all_items(c, job["id"])}
        assert len(workers) == 1 and next(iter(workers)).startswith("tls://127.0.0.1:")
        # The local cluster's workers tick and monitor less often than Dask's defaults
        # (it costs the items CPU), and would run without Dask's profiler but for the
        # user's own Dask config, which wins.
        job = c.submit("profiling")
        assert wait_job(c, job["id"], 30)["result"] == [True, "1s", "2s"]

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


def test_local_cluster_without_cryptography_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    from bulkrunner.executors.dask import DaskExecutor

    # Security.temporary() imports cryptography when called: fail before any cluster starts.
    monkeypatch.setitem(sys.modules, "cryptography", None)
    cfg = load_config(dask_config(tmp_path, "", max_workers=1))
    with pytest.raises(ConfigError, match=r"cryptography.*pip install cryptography"):
        DaskExecutor(cfg)


@needs_dask
@pytest.mark.slow
def test_local_cluster_refuses_clients_without_its_certificate(tmp_path: Path,
                                                               serve: Serve) -> None:
    # The finding: the local cluster listened on plain tcp:// on loopback, so any local
    # user's `distributed.Client(address).run_on_scheduler(...)` ran code inside the server
    # (and a worker's "run" handler on a worker), as the server's user. Now it is TLS with
    # a certificate of this run only, which no other process has.
    server = serve(dask_config(tmp_path, "", max_workers=1))
    m = wait_for(lambda: re.search(r"started a local Dask cluster of 1 worker processes at "
                                   r"([a-z]+://[\d.]+:\d+)", server.log()), 60,
                 "the server did not log its local cluster's address")
    scheduler = m.group(1)
    assert scheduler.startswith("tls://127.0.0.1:"), scheduler
    with Client(server.url, timeout=30) as c:
        h = wait_for(lambda: (r := healthz(c))["status"] == "ok" and r, 60,
                     "local cluster never became healthy")
        assert f"at {scheduler}" in h["executor"]["detail"], h
        job = c.submit("add", {"a": 1}, items=[{"b": i} for i in range(5)])
        assert wait_job(c, job["id"], 60)["state"] == "succeeded"
        worker = all_items(c, job["id"])[0]["worker"]
        assert worker.startswith("tls://127.0.0.1:"), worker

        procs = {how: attack(how, worker if how.startswith("worker") else scheduler)
                 for how in ATTACKS}
        for how, proc in procs.items():
            result = attack_result(how, proc)
            assert "ran" not in result, f"{how}: another process ran code: {result}"
            assert re.search(ATTACKS[how], result["error"]), f"{how}: {result}"
            assert result["seconds"] < 15, f"{how} took {result['seconds']:.1f} s to fail"

        # The server's own client still has the certificate: items run as before.
        job = c.submit("add", {"a": 2}, items=[{"b": i} for i in range(5)])
        done = wait_job(c, job["id"], 60)
        assert done["state"] == "succeeded", done
        assert [it["result"] for it in all_items(c, job["id"])] == [2, 3, 4, 5, 6]


@needs_dask
@pytest.mark.slow
def test_external_scheduler_with_tls_from_dask_config(tmp_path: Path,
                                                      dask_procs: DaskProcesses,
                                                      serve: Serve) -> None:
    # The recipe of docs/dask.md: scheduler and workers started with --tls-* files, the
    # server given its client certificate through Dask's own config (environment here).
    from distributed.security import Security

    creds = Security.temporary()  # type: ignore[no-untyped-call]  # self-signed: its own CA
    cert, key = tmp_path / "dask.pem", tmp_path / "dask.key"
    cert.write_text(creds.tls_scheduler_cert)
    key.write_text(creds.tls_scheduler_key)
    key.chmod(0o600)
    dask_procs.tls = ["--protocol", "tls", "--tls-ca-file", str(cert),
                      "--tls-cert", str(cert), "--tls-key", str(key)]
    address = dask_procs.start_scheduler()
    assert address.startswith("tls://127.0.0.1:"), address
    worker = dask_procs.start_worker()
    assert worker.startswith("tls://127.0.0.1:"), worker
    server = serve(dask_config(tmp_path, address, max_workers=1), env={
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(cert),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(cert),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(key)})
    with Client(server.url, timeout=30) as c:
        wait_for(lambda: healthz(c)["status"] == "ok", 30,
                 "the server never connected to the TLS scheduler")
        job = c.submit("add", {"a": 1}, items=[{"b": i} for i in range(5)])
        assert wait_job(c, job["id"], 60)["state"] == "succeeded"
        assert {it["worker"] for it in all_items(c, job["id"])} == {worker}
    for how in ("scheduler-no-cert", "scheduler-own-cert"):
        result = attack_result(how, attack(how, address))
        assert "ran" not in result and re.search(ATTACKS[how], result["error"]), result


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (children, their children, ...), from /proc."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except FileNotFoundError:
                continue
            for k in map(int, kids):
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not reaped it yet


@needs_dask
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_local_cluster_runs_apart_and_ends_with_a_killed_server(tmp_path: Path,
                                                                serve: Serve) -> None:
    # The scheduler and nannies run in a child process of the server (so the scheduler
    # never waits for the server's threads), and nothing of the cluster outlives the
    # server, not even after kill -9: the child sees its stdin close and stops the cluster.
    server = serve(dask_config(tmp_path, "", max_workers=1))
    with Client(server.url, timeout=30) as c:
        wait_for(lambda: healthz(c)["status"] == "ok", 60, "local cluster never became healthy")
        job = c.submit("add", {"a": 1}, items=[{"b": i} for i in range(5)])
        assert wait_job(c, job["id"], 60)["state"] == "succeeded"
    assert server.proc is not None
    below = _descendants(server.proc.pid)
    cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                for p in below if _alive(p)}
    assert any("bulkrunner.executors.dask_cluster" in cmd for cmd in cmdlines.values()), (
        cmdlines)
    assert len(cmdlines) >= 2, f"no worker process below the cluster's: {cmdlines}"

    server.signal(signal.SIGKILL)
    server.wait(10)
    wait_for(lambda: not any(_alive(p) for p in cmdlines), 30,
             f"cluster processes outlived the killed server: "
             f"{[cmdlines[p] for p in cmdlines if _alive(p)]}")


@needs_dask
@pytest.mark.parametrize("hangs", [False, True], ids=["exits", "hangs"])
def test_a_local_cluster_that_cannot_start_says_so(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   hangs: bool) -> None:
    from distributed.security import Security

    from bulkrunner.executors.dask_cluster import LocalClusterProcess

    # The cluster's process finds a broken Dask: it ends at once, or never answers.
    fake = tmp_path / "broken" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import time\ntime.sleep(600)\n" if hangs
                                      else "raise ImportError('a broken install')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), str(ROOT)]))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        LocalClusterProcess(1, Security(), timeout=3)
    if hangs:
        assert str(e.value) == "the local Dask cluster did not start within 3 s"
    else:
        assert str(e.value) == ("the local Dask cluster did not start (its process exited "
                                "with 1; its errors are in the server's log above)")
    assert time.monotonic() - t0 < 30


@needs_dask
def test_serve_with_a_local_cluster_that_cannot_start_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `serve` prints as a sentence and exit 2, not a RuntimeError's traceback.
    from bulkrunner.executors.dask import DaskExecutor

    fake = tmp_path / "broken" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), str(ROOT)]))
    cfg = load_config(dask_config(tmp_path, "", max_workers=1))
    with pytest.raises(ConfigError, match=r"did not start .*bulkrunner\[dask\]") as e:
        DaskExecutor(cfg)
    assert e.value.key == "executor.address"
