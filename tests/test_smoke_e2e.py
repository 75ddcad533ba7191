"""The README's first-use path against a real server process."""

from __future__ import annotations

import json

from tests.conftest import SAMPLE_TASKS, run_cli, toml_config


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


def test_the_server_hands_the_interpreter_round_often(serve, tmp_path) -> None:
    # A request thread waits for a thread busy in Python at most this long each time it
    # needs the interpreter back: one-item submissions next to a bulk being checked.
    from bulkrunner.server.run import SWITCH_INTERVAL

    config = toml_config(tmp_path, tasks={**SAMPLE_TASKS, "interval": "sys:getswitchinterval"})
    server = serve(config)
    sub = run_cli("submit", "interval", "--wait", "--json", url=server.url, timeout=60)
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["result"] == SWITCH_INTERVAL < 0.005
