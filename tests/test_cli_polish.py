"""CLI polish: global options after the command, ``retry --wait``, ids on stdout, what
``results --output`` wrote, richer --help, the hint for a missing param, and a graceful
stop of the process pool logged as one.

One ``bulkrunner serve`` subprocess serves the module (as in test_cli.py); every test
submits its own jobs.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from bulkrunner.client.cli import cli
from bulkrunner.client.reading import _RowCounter
from bulkrunner.executors.process import ProcessExecutor
from tests.conftest import ServerProcess, child_env, run_cli, toml_config, wait_for, work_unit

ID = re.compile(r"^[0-9a-f]{32}$")
pytestmark = pytest.mark.usefixtures("isolated_cwd")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(toml_config(tmp_path_factory.mktemp("polish-server"),
                                   max_workers=4)) as s:
        yield s


def invoke(args: list[str], input: str | None = None) -> Result:
    return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result.stdout


def submit(server: ServerProcess, *args: str) -> str:
    out = ok(invoke(["--url", server.url, "submit", *args])).strip()
    assert ID.match(out), out
    return out


# --------------------------------------------------------------------------- 1 global options
def test_url_and_token_may_follow_the_command(server: ServerProcess) -> None:
    ident = submit(server, "add", "-p", "a=1")
    r = invoke(["status", "--url", server.url, "--token", "unused", ident, "--json"])
    assert json.loads(ok(r))["id"] == ident
    assert json.loads(ok(invoke(["tasks", "--json", "--url", server.url])))["tasks"]


def test_the_commands_option_wins_over_the_groups(server: ServerProcess) -> None:
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    assert ok(invoke(["--url", dead, "tasks", "--url", server.url]))
    r = invoke(["--url", server.url, "tasks", "--url", dead])
    assert r.exit_code == 3 and dead in r.stderr, r.output


def test_config_may_follow_the_command(server: ServerProcess, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.url.rsplit(":", 1)[1]
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
    assert ok(invoke(["tasks", "--config", str(cfg)]))
    # ... and over $BULKRUNNER_CONFIG, which the group reads.
    monkeypatch.setenv("BULKRUNNER_CONFIG", str(tmp_path / "nope.toml"))
    assert ok(invoke(["tasks", "--config", str(cfg)]))


def test_serve_config_after_the_command(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    r = invoke(["serve", "--config", str(missing)])
    assert r.exit_code == 2 and "nope.toml" in r.stderr, r.output


def test_serve_config_after_the_command_as_a_real_server(tmp_path: Path) -> None:
    cfg = toml_config(tmp_path)
    # ServerProcess puts --config before serve; start one with it after, by hand.
    log = tmp_path / "after.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bulkrunner", "serve", "--config",
                                 str(cfg)], cwd=tmp_path, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            url = wait_for(lambda: (m := re.search(r"serving on (http://\S+)",
                                                   log.read_text())) and m.group(1),
                           30, "server with --config after serve")
            got = run_cli("tasks", "--json", "--url", url)
            assert got.returncode == 0, got.stderr
            assert "add" in {t["name"] for t in json.loads(got.stdout)["tasks"]}
        finally:
            proc.kill()
            proc.wait(10)


def test_every_command_shows_the_global_options_in_its_help() -> None:
    for name in cli.commands:  # type: ignore[attr-defined]
        text = ok(invoke([name, "--help"]))
        for opt in ("--config FILE", "--url URL", "--token TOKEN"):
            assert opt in text, (name, opt)


# --------------------------------------------------------------------------- 2 retry, cancel
def _flaky_job(server: ServerProcess, tmp_path: Path) -> str:
    items = tmp_path / "flaky.jsonl"
    items.write_text("".join(json.dumps({"path": str(tmp_path / f"c{i}"),
                                         "fail_times": i % 2}) + "\n" for i in range(4)))
    ident = submit(server, "flaky", "--items", str(items), "--max-attempts", "1")
    assert invoke(["--url", server.url, "wait", ident, "--timeout", "30"]).exit_code == 1
    return ident


def test_retry_prints_the_id_and_waits(server: ServerProcess, tmp_path: Path) -> None:
    ident = _flaky_job(server, tmp_path)
    r = invoke(["--url", server.url, "retry", ident[:10], "--wait", "--timeout", "30"])
    assert r.exit_code == 0, r.output
    assert r.stdout == ident + "\n", repr(r.stdout)
    assert "2 item(s) queued again" in r.stderr and "succeeded" in r.stderr


def test_retry_wait_exit_1_when_it_fails_again(server: ServerProcess) -> None:
    ident = submit(server, "square", "-p", "x=-3", "--max-attempts", "1")
    assert invoke(["--url", server.url, "wait", ident, "--timeout", "30"]).exit_code == 1
    r = invoke(["--url", server.url, "retry", ident, "--wait", "--timeout", "30"])
    assert r.exit_code == 1, r.output
    assert r.stdout == ident + "\n" and "negative" in r.stderr
    again = invoke(["--url", server.url, "retry", ident, "--wait", "--json",
                    "--timeout", "30"])
    assert again.exit_code == 1 and json.loads(again.stdout)["state"] == "failed"


def test_retry_wait_timeout_is_exit_4(server: ServerProcess) -> None:
    ident = submit(server, "slow", "-p", "seconds=30")
    ok(invoke(["--url", server.url, "cancel", ident]))
    r = invoke(["--url", server.url, "retry", ident, "--wait", "--timeout", "0.3"])
    assert r.exit_code == 4, r.output
    assert r.stdout == ident + "\n"
    ok(invoke(["--url", server.url, "cancel", ident]))


def test_retry_timeout_needs_wait(server: ServerProcess) -> None:
    r = invoke(["--url", server.url, "retry", "abc", "--timeout", "3"])
    assert r.exit_code == 2 and "--wait" in r.stderr, r.output


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_cancel_quiet_prints_only_the_id_on_stdout(server: ServerProcess, flag: str) -> None:
    ident = submit(server, "slow", "-p", "seconds=30")
    r = invoke(["--url", server.url, "cancel", ident[:12], flag])
    assert ok(r) == ident + "\n"
    assert re.search(rf"cancelled {ident} \(\d+ item\(s\) cancelled\)", r.stderr), r.stderr


def test_cancel_and_retry_without_quiet_keep_the_sentence_on_stdout(
        server: ServerProcess) -> None:
    ident = submit(server, "slow", "-p", "seconds=30")
    out = ok(invoke(["--url", server.url, "cancel", ident]))
    assert out.startswith(f"cancelled {ident} (") and out.count("\n") == 1, out
    out = ok(invoke(["--url", server.url, "retry", ident]))
    assert out == f"retrying {ident}: 1 item(s) queued again\n", out
    ok(invoke(["--url", server.url, "cancel", ident]))


def test_retry_quiet_prints_only_the_id(server: ServerProcess) -> None:
    ident = submit(server, "slow", "-p", "seconds=30")
    ok(invoke(["--url", server.url, "cancel", ident]))
    r = invoke(["--url", server.url, "retry", "-q", ident])
    assert ok(r) == ident + "\n" and "queued again" in r.stderr
    ok(invoke(["--url", server.url, "cancel", ident]))


def test_id_capture_in_a_real_process(server: ServerProcess) -> None:
    ident = submit(server, "slow", "-p", "seconds=30")
    proc = run_cli("cancel", "-q", ident, url=server.url)
    assert proc.returncode == 0 and proc.stdout.strip() == ident, proc
    assert "cancelled" in proc.stderr


# --------------------------------------------------------------------------- 3 results -o
def test_results_output_says_what_it_wrote(server: ServerProcess, tmp_path: Path) -> None:
    items = tmp_path / "sq.csv"
    items.write_text("x\n" + "".join(f"{i}\n" for i in range(200)))
    ident = submit(server, "square", "--items", str(items))
    assert invoke(["--url", server.url, "wait", ident, "--timeout", "60"]).exit_code == 0
    csv_out = tmp_path / "out.csv"
    r = invoke(["--url", server.url, "results", ident, "--format", "csv", "-o", str(csv_out)])
    assert ok(r) == ""
    assert r.stderr == f"wrote 200 rows (CSV) to {csv_out}\n"
    jl = tmp_path / "out.jsonl"
    r = invoke(["--url", server.url, "results", ident, "--output", str(jl)])
    assert r.stderr == f"wrote 200 lines (JSON Lines) to {jl}\n"
    assert len(jl.read_text().splitlines()) == 200


def test_row_counter_knows_quoted_newlines_and_split_chunks() -> None:
    data = b'index,error\n0,"two\nlines"\n1,"a ""q"" and\r\nmore"\n2,plain\n'
    for size in (1, 2, 3, 7, len(data)):
        c = _RowCounter("csv")
        for i in range(0, len(data), size):
            c.feed(data[i:i + size])
        assert c.rows() == 3, size
    last = _RowCounter("csv")
    last.feed(b"a\n1\n2")  # no newline after the last row
    assert last.describe() == "2 rows (CSV)"
    one = _RowCounter("jsonl")
    one.feed(b'{"a": 1}\n')
    assert one.describe() == "1 line (JSON Lines)"
    empty = _RowCounter("csv")
    empty.feed(b"")
    assert empty.describe() == "0 rows (CSV)"


# --------------------------------------------------------------------------- 4 help
def test_every_command_has_an_example_and_a_full_short_help() -> None:
    top = ok(invoke(["--help"]))
    for name, command in cli.commands.items():  # type: ignore[attr-defined]
        assert isinstance(command, click.Command)
        text = ok(invoke([name, "--help"]))
        assert re.search(rf"^  Examples?:\n    bulkrunner {name}\b", text, re.M), (name, text)
        short = command.get_short_help_str(limit=1000)
        assert not short.endswith("..."), (name, short)
        assert short in " ".join(top.split()), (name, short)


def test_submit_help_names_the_item_formats_and_exit_codes() -> None:
    text = " ".join(ok(invoke(["submit", "--help"])).split())
    for fmt in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        assert fmt in text, fmt
    assert "Exit codes:" in text
    for code in ("0 submitted", "1 with --wait", "2 usage", "3 the server"):
        assert code in text, code


# --------------------------------------------------------------------------- 5 missing param
def test_missing_param_gets_a_hint_with_its_type(server: ServerProcess) -> None:
    r = invoke(["--url", server.url, "submit", "add"])
    assert r.exit_code == 2, r.output
    assert "params.a: required param is missing" in r.stderr
    assert "hint: give it with --param a=<int>" in r.stderr
    assert "--param b=" not in r.stderr  # b has a default
    assert r.stdout == ""


def test_several_missing_params_get_a_hint_each(server: ServerProcess) -> None:
    r = invoke(["--url", server.url, "submit", "typed", "-p", "n=1"])
    assert r.exit_code == 2, r.output
    hints = re.findall(r"hint: give it with --param (\w+)=<(\w+)>", r.stderr)
    assert ("ratio", "float") in hints and ("flag", "bool") in hints, r.stderr


def test_other_refusals_get_no_hint(server: ServerProcess) -> None:
    r = invoke(["--url", server.url, "submit", "add", "-p", "a=1", "-p", "zz=2"])
    assert r.exit_code == 2 and "params.zz" in r.stderr and "hint" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- 6 graceful stop
def test_shutdown_with_a_running_item_is_logged_as_a_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    pool = ProcessExecutor(1, preload=["tests.sample_tasks"])
    try:
        fut = pool.submit(work_unit("tests.sample_tasks:slow", {"seconds": 30}, index=3,
                                    job_id="jstop", context_param="ctx"))
        wait_for(fut.running, 20, "the item to start")
        time.sleep(0.2)  # in the worker, not just sent to it
    finally:
        with caplog.at_level(logging.INFO, logger="bulkrunner.executors.process"):
            pool.shutdown()
    records = [r for r in caplog.records if r.name == "bulkrunner.executors.process"]
    assert not [r for r in records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in records]
    stops = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(stops) == 1, stops
    assert "stopping" in stops[0] and "item 3 of job jstop" in stops[0], stops
    assert "back to the queue" in stops[0] and "SIGKILL" not in stops[0]
    exc: Any = fut.exception(timeout=5)
    assert exc is not None and "shut down" in str(exc)


def test_a_crash_is_still_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    pool = ProcessExecutor(1, preload=["tests.sample_tasks"])
    try:
        with caplog.at_level(logging.INFO, logger="bulkrunner.executors.process"):
            fut = pool.submit(work_unit("tests.sample_tasks:sigkill_self"))
            assert fut.exception(timeout=20) is not None
    finally:
        pool.shutdown()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("died with signal SIGKILL" in m for m in warned), warned
