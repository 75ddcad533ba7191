"""The README's first-use path against a real server process."""

from __future__ import annotations

from tests.conftest import run_cli


def test_submit_wait_status(serve) -> None:
    server = serve()
    sub = run_cli("submit", "add", "--param", "a=2", "--param", "b=3", url=server.url,
                  timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert len(job_id) == 32
    waited = run_cli("wait", job_id, "--timeout", "30", url=server.url, timeout=60)
    assert waited.returncode == 0, waited.stderr
    st = run_cli("status", job_id[:8], url=server.url, timeout=60)
    assert st.returncode == 0, st.stderr
    assert "succeeded" in st.stdout and "result    5" in st.stdout
