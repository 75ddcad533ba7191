"""The README's first-use path against a real server process."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bulkrunner", "--url", url, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_submit_wait_status(serve) -> None:
    server = serve()
    sub = _cli(server.url, "submit", "add", "--param", "a=2", "--param", "b=3")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert len(job_id) == 32
    waited = _cli(server.url, "wait", job_id, "--timeout", "30")
    assert waited.returncode == 0, waited.stderr
    st = _cli(server.url, "status", job_id[:8])
    assert st.returncode == 0, st.stderr
    assert "succeeded" in st.stdout and "result    5" in st.stdout
