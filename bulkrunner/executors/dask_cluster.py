"""The local Dask cluster in a process of its own: its scheduler and nannies run there, and
the nannies start the worker processes.

In the server's process the scheduler's event loop competed with the server's threads for
one interpreter lock: every batch handed over, every event of progress and every outcome
went through a loop that waited for request threads and the dispatcher, and the longer the
server ran the more its own bookkeeping grew there (items per second fell by a third over
ten bulks of 50,000, with the server's memory growing by 130 MB).

The cluster process is told its size and TLS credentials on its standard input (a pickle:
it comes from this server's own process, through a pipe only the two hold), answers with
its addresses on one line of JSON on its standard output, and then runs until its
standard input closes: when the server closes it, and also when the server dies, even by
``kill -9``, since the kernel closes the pipe then.
"""

from __future__ import annotations

import json
import pickle
import selectors
import subprocess
import sys
import time
from typing import Any

from distributed.security import Security

#: Dask's own upkeep, quieter on the local cluster: what Dask does every few milliseconds
#: is CPU the items lose on a small machine, where the scheduler, the workers and the
#: server share the cores. Idle, a cluster of two workers took 13 % of a core with Dask's
#: defaults (the profiler sampling each worker thread's stack every 10 ms, a 20 ms tick in
#: every process to spot a blocked event loop, a system monitor every 500 ms), and 4 %
#: with these. A loop blocked for 3 s is still reported; the dashboard's system plots
#: refresh every 2 s. A value set in the user's Dask config (a file or a ``DASK_*``
#: variable) is kept.
QUIET: dict[str, object] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


class LocalClusterProcess:
    """A :class:`distributed.LocalCluster` of ``n_workers`` worker processes (one thread
    each, on loopback, TLS with ``security``) run by a child process."""

    def __init__(self, n_workers: int, security: Security, timeout: float = 60.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bulkrunner.executors.dask_cluster"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(pickle.dumps((n_workers, security)))
            self._proc.stdin.flush()
            line = self._read_line(timeout)
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
            raise
        info = json.loads(line)
        #: The scheduler's address (``tls://127.0.0.1:port``) and its dashboard.
        self.scheduler_address: str = info["address"]
        self.dashboard_link: str = info["dashboard"]

    def _read_line(self, timeout: float) -> str:
        """The child's first line: its addresses, or an error when it could not start."""
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    line = self._proc.stdout.readline().decode()
                    if line:
                        return line
                    break  # it closed its output: it ended
                if self._proc.poll() is not None:
                    break
        code = self._proc.poll()
        raise RuntimeError("the local Dask cluster did not start" + (
            f" (its process exited with {code}; its errors are in the server's log above)"
            if code is not None else f" within {timeout:g} s"))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the cluster: its workers, nannies and scheduler, then its process."""
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()  # its signal to close the cluster
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _serve() -> int:
    """The child's side: start the cluster, say where it is, run until stdin closes."""
    import dask.config
    from distributed import LocalCluster

    n_workers, security = pickle.load(sys.stdin.buffer)
    user = dask.config.collect()  # the user's config files and DASK_* variables
    # The nannies hand the config on to the workers they start.
    dask.config.set({k: v for k, v in QUIET.items()
                     if dask.config.get(k, None, config=user) is None})
    # The dashboard on a free loopback port: dashboard_address=None still binds the fixed
    # :8787, which a second server would collide with. With security= the scheduler, the
    # nannies and the workers all listen on tls:// addresses.
    cluster: Any = LocalCluster(  # type: ignore[no-untyped-call]  # untyped in distributed
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", security=security)
    try:
        sys.stdout.write(json.dumps({"address": cluster.scheduler_address,
                                     "dashboard": cluster.dashboard_link}) + "\n")
        sys.stdout.flush()
        while sys.stdin.buffer.read(65536):
            pass  # nothing more is ever sent: this waits for the end of the input
    finally:
        cluster.close(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
