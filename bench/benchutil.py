"""Shared plumbing for the benchmarks: server subprocesses, wrk runs, /proc readings.

Everything here is loopback only and uses port 0 (the server picks a free port and logs
it). Each server is its own subprocess with its output in a log file (never a pipe: an
unread pipe would block the server under load).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WRK = "/usr/bin/wrk"
_URL_RE = re.compile(r"serving on (http://\S+)")


# --------------------------------------------------------------------------- servers
class Server:
    """A server subprocess whose log announces ``serving on http://host:port``."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path,
                 env: dict[str, str] | None = None, src: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        # Another checkout of bulkrunner to run (bench.tasks still from here): ``src``,
        # else $BENCH_SRC.
        other = str(src) if src is not None else os.environ.get("BENCH_SRC")
        path = str(ROOT)
        if other and Path(other).resolve() != ROOT:
            # That checkout has a bench/ of its own (older tasks): a directory holding only
            # a link to this bench/ comes first, so bench.* is still this one.
            shim = workdir / "bench-pythonpath"
            shim.mkdir(exist_ok=True)
            if not (shim / "bench").is_symlink():
                (shim / "bench").symlink_to(BENCH, target_is_directory=True)
            path = os.pathsep.join([str(shim), other, str(ROOT)])
        self.env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        self.env.pop("BULKRUNNER_URL", None)
        self.env.pop("BULKRUNNER_CONFIG", None)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> Server:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            m = _URL_RE.search(self.log())
            if m:
                self.url = m.group(1)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def bulkrunner_config(workdir: Path, *, max_workers: int = 4, tasks: dict[str, str] | None = None,
                      threads: int = 8, jobs: str = "", executor: str = "thread") -> Path:
    """A config for a benchmark server: loopback, port 0, ``executor`` (threads unless
    said), ``bench.db``."""
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", f"threads = {threads}",
             "shutdown_grace = 0",
             "[executor]", f'type = "{executor}"', f"max_workers = {max_workers}",
             "[store]", 'path = "bench.db"', "[jobs]", jobs, "[tasks]"]
    lines += [f'{name} = "{target}"' for name, target in (tasks or {}).items()]
    path = workdir / "bulkrunner.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bulkrunner_server(workdir: Path, config: Path) -> Server:
    """``bulkrunner serve`` at log level info (its "serving on" line gives the URL)."""
    return Server("bulkrunner", [sys.executable, "-m", "bulkrunner", "--config", str(config),
                                 "serve", "--log-level", "info"], workdir)


def remove_workdir(workdir: Path) -> None:
    """Delete a benchmark's temp dir, unless $BENCH_KEEP is set (then say where it is)."""
    if os.environ.get("BENCH_KEEP"):
        print(f"kept {workdir} (BENCH_KEEP is set)", file=sys.stderr)
        return
    shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- HTTP
def http_json(method: str, url: str, body: Any = None, timeout: float = 30.0
              ) -> tuple[int, Any]:
    """One request with the stdlib; returns (status, decoded JSON body)."""
    data = None if body is None else (body if isinstance(body, bytes)
                                      else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")

def timestamp(iso: str) -> float:
    """Unix seconds of one of the API's ISO 8601 times (``...Z``)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def wait_finished(url: str, ident: str, timeout: float) -> dict[str, Any]:
    """The job once it has finished (polled every 50 ms); RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status, job = http_json("GET", f"{url}/api/v1/jobs/{ident}")
        if status == 200 and job["finished_at"] is not None:
            return job  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {ident} not finished after {timeout} s: "
                               f"{job.get('items') if status == 200 else status}")
        time.sleep(0.05)


class KeepAlive:
    """One persistent HTTP/1.1 connection (keep-alive): a sequential Python client.

    ``http.client`` sets TCP_NODELAY and sends headers and a bytes body in one write, so
    what is timed is the server's answer, not Nagle or delayed ACKs.
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        u = urllib.parse.urlsplit(url)
        assert u.hostname is not None and u.port is not None, url
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        self.headers = {"Content-Type": "application/json"}

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request and read the whole answer (the connection stays open)."""
        self.conn.request(method, path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- wrk
_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"connect\\": %%d, " ..
    "\\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d, " ..
    "\\"p50\\": %%d, \\"p90\\": %%d, \\"p99\\": %%d, \\"max\\": %%d, \\"mean\\": %%f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def write_lua(path: Path, body: dict[str, Any]) -> Path:
    """A wrk script that POSTs ``body`` as JSON and prints a machine-readable summary."""
    text = json.dumps(body)
    path.write_text(_LUA % {"body": "[[" + text + "]]"})
    return path


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int          # socket errors (connect, read, write, timeout)
    non2xx: int          # responses outside 2xx/3xx
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> int:
        """Requests answered 2xx (the 202s of a submission benchmark)."""
        return self.requests - self.non2xx


def run_wrk(url: str, script: Path, *, connections: int, threads: int, seconds: float,
            timeout_s: float = 5.0) -> WrkResult:
    """Run wrk against ``url`` and parse the summary the script's ``done`` prints."""
    argv = [WRK, f"-c{connections}", f"-t{threads}", f"-d{max(1, round(seconds))}s", "--latency",
            f"--timeout={timeout_s:g}s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"WRKJSON (\{.*\})", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(m.group(1))
    return WrkResult(requests=d["requests"], seconds=d["duration_us"] / 1e6,
                     errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
                     non2xx=d["status"], p50_ms=d["p50"] / 1000, p90_ms=d["p90"] / 1000,
                     p99_ms=d["p99"] / 1000, max_ms=d["max"] / 1000)


# --------------------------------------------------------------------------- /proc
def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- stats
def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min-max)`` of the runs, or the single value."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
