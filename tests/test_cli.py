"""The CLI through click's CliRunner, against one real server.

One ``bulkrunner serve`` subprocess serves the whole module (started once, to save time);
every test submits its own jobs, so they do not depend on each other.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import bulkrunner.client.cli
from bulkrunner.client.cli import cli
from tests.conftest import ServerProcess, free_port, run_cli, toml_config, wait_job_state

ID = re.compile(r"^[0-9a-f]{32}$")
# No stray ./bulkrunner.toml or $BULKRUNNER_* from the environment: every test runs in its
# own tmp_path (so nothing the CLI writes lands in the repository).
pytestmark = pytest.mark.usefixtures("isolated_cwd")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(toml_config(tmp_path_factory.mktemp("cli-server"), max_workers=4)) as s:
        yield s


def invoke(args: list[str], input: str | bytes | None = None) -> Result:
    """Run the CLI in-process; an exception other than SystemExit fails the test."""
    return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)


def br(server: ServerProcess, *args: str, input: str | bytes | None = None) -> Result:
    """Run the CLI against the server. ``wait`` gets --timeout 30 in the tests that use it,
    so a job that never finishes fails with exit 4 instead of hanging."""
    return invoke(["--url", server.url, *args], input=input)


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}"
    return result.stdout


def submit(server: ServerProcess, *args: str) -> str:
    out = ok(br(server, "submit", *args))
    assert ID.match(out.strip()), out
    return out.strip()


def job_json(server: ServerProcess, ident: str) -> dict[str, Any]:
    job: dict[str, Any] = json.loads(ok(br(server, "status", ident, "--json")))
    return job


def wait_done(server: ServerProcess, ident: str, timeout: float = 30) -> dict[str, Any]:
    """Poll ``bulkrunner status --json`` until the job has finished."""
    return wait_job_state(lambda: job_json(server, ident), timeout, f"job {ident}")


def error_line(result: Result, code: int) -> str:
    """Check the exit code and that stderr has one readable error and no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    err = result.stderr
    assert "Traceback" not in err, err
    assert err.strip(), "no message on stderr"
    return err


# --------------------------------------------------------------------------- submit
def test_submit_prints_only_the_id(server: ServerProcess) -> None:
    r = br(server, "submit", "add", "--param", "a=2", "--param", "b=3")
    out = ok(r)
    assert ID.match(out.strip()) and out == out.strip() + "\n", repr(out)
    job = wait_done(server, out.strip())
    assert job["state"] == "succeeded" and job["result"] == 5


def test_params_are_coerced_by_type_hint(server: ServerProcess) -> None:
    ident = submit(server, "typed", "-p", "n=5", "-p", "ratio=2", "-p", "flag=yes",
                   "-p", "name=007", "-p", "mode=slow", "-p", "color=green",
                   "-p", 'tags:=["a", "b"]')
    params = job_json(server, ident)["params"]
    assert params == {"n": 5, "ratio": 2.0, "flag": True, "name": "007", "mode": "slow",
                      "color": "green", "tags": ["a", "b"]}
    assert type(params["n"]) is int and type(params["ratio"]) is float
    job = wait_done(server, ident)
    assert job["state"] == "succeeded", job
    assert job["result"]["n"] == 5 and job["result"]["color"] == "green"


def test_param_json_form_passes_json_as_is(server: ServerProcess) -> None:
    ident = submit(server, "echo", "--param", 'data:={"x": [1, 2.5, null]}',
                   "--param", "n:=7", "--param", "s=7", "--param", "eq=a=b")
    job = wait_done(server, ident)
    # echo takes **params: no hint, so K=V stays text and K:=JSON is the way to a number.
    assert job["params"] == {"data": {"x": [1, 2.5, None]}, "n": 7, "s": "7", "eq": "a=b"}
    assert job["result"] == job["params"]


@pytest.mark.parametrize(("args", "needle"), [
    (["add", "--param", "a=abc"], "a"),
    (["typed", "--param", "flag=perhaps", "--param", "n=1", "--param", "ratio=1"], "flag"),
    (["add", "--param", "a"], "K=V"),
    (["add", "--param", "a:={bad"], "JSON"),
])
def test_bad_param_is_a_usage_error(server: ServerProcess, args: list[str],
                                    needle: str) -> None:
    err = error_line(br(server, "submit", *args), 2)
    assert needle in err


@pytest.mark.parametrize(("args", "needle"), [
    (["nosuchtask"], "unknown task 'nosuchtask'"),
    (["add"], "params.a"),
    (["add", "--param", "a=1", "--param", "zz=2"], "params.zz"),
    (["typed", "-p", "n=1", "-p", "ratio=1", "-p", "flag=1", "-p", "mode:=\"x\"",
      "-p", "tags:=[1]"], "params.mode"),
])
def test_server_refusal_is_exit_2_with_its_message(server: ServerProcess, args: list[str],
                                                   needle: str) -> None:
    r = br(server, "submit", *args)
    err = error_line(r, 2)
    assert needle in err, err
    assert r.stdout == ""


def test_submit_items_from_csv_file(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("n,ratio,flag\n1,0.5,true\n2,1.5,false\n")
    ident = submit(server, "typed", "--items", str(path), "--param", "name=bulk")
    job = wait_done(server, ident)
    assert job["state"] == "succeeded" and job["items"]["total"] == 2
    lines = ok(br(server, "results", ident)).splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["params"]["n"] for r in rows] == [1, 2]
    assert rows[1]["params"]["flag"] is False and rows[1]["params"]["name"] == "bulk"


def test_submit_items_from_jsonl_file(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b": 5}\n')
    ident = submit(server, "add", "--items", str(path), "--param", "b=10")
    job = wait_done(server, ident)
    assert job["state"] == "succeeded"
    rows = [json.loads(line) for line in ok(br(server, "results", ident)).splitlines()]
    assert [r["result"] for r in rows] == [11, 7]


def test_submit_items_from_stdin(server: ServerProcess) -> None:
    ident = submit_stdin = ok(br(server, "submit", "square", "--items", "-",
                                 input='{"x": 3}\n{"x": 4}\n{"x": 5}\n')).strip()
    assert ID.match(submit_stdin)
    job = wait_done(server, ident)
    assert job["state"] == "succeeded" and job["items"]["total"] == 3


def test_submit_bad_items_file(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("n,ratio,flag\n1,0.5,true\n2,zero,true\n")
    err = error_line(br(server, "submit", "typed", "--items", str(path)), 2)
    assert "row 3" in err and "ratio" in err
    missing = error_line(br(server, "submit", "add", "--items", str(tmp_path / "no.csv")), 2)
    assert "no.csv" in missing


def test_thousand_item_csv_through_the_cli(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "thousand.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i}\n" for i in range(1000)))
    r = br(server, "submit", "add", "--items", str(path), "--wait")
    assert r.exit_code == 0, r.output
    ident = r.stdout.splitlines()[0]
    out = tmp_path / "out.csv"
    ok(br(server, "results", ident, "--format", "csv", "--output", str(out)))
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 1000
    assert all(int(row["result"]) == 2 * int(row["a"]) for row in rows)


def test_submit_wait_exit_codes(server: ServerProcess) -> None:
    good = br(server, "submit", "add", "--param", "a=1", "--wait")
    assert good.exit_code == 0, good.output
    assert ID.match(good.stdout.splitlines()[0])
    assert "succeeded" in good.stderr  # the plain progress lines
    bad = br(server, "submit", "square", "--param", "x=-2", "--wait")
    assert bad.exit_code == 1, bad.output
    assert ID.match(bad.stdout.splitlines()[0])
    assert "ValueError" in bad.stderr and "negative" in bad.stderr


def test_submit_json_and_key(server: ServerProcess) -> None:
    first = json.loads(ok(br(server, "submit", "add", "-p", "a=1", "--key", "cli-k",
                             "--json")))
    again = json.loads(ok(br(server, "submit", "add", "-p", "a=1", "--key", "cli-k",
                             "--json")))
    assert first["id"] == again["id"] and first["key"] == "cli-k"
    err = error_line(br(server, "submit", "add", "-p", "a=2", "--key", "cli-k"), 2)
    assert "cli-k" in err


def test_submit_priority_and_attempts(server: ServerProcess) -> None:
    job = json.loads(ok(br(server, "submit", "add", "-p", "a=1", "--priority", "7",
                           "--max-attempts", "3", "--timeout", "12.5", "--json")))
    assert job["priority"] == 7 and job["max_attempts"] == 3 and job["timeout"] == 12.5


# --------------------------------------------------------------------------- status
def test_status_summary_prefix_and_json(server: ServerProcess) -> None:
    ident = submit(server, "add", "--param", "a=40", "--param", "b=2")
    wait_done(server, ident)
    out = ok(br(server, "status", ident))
    assert ident in out
    assert re.search(r"^state\s+succeeded$", out, re.M), out
    assert re.search(r"^result\s+42$", out, re.M), out
    assert re.search(r"^task\s+add$", out, re.M), out
    assert ok(br(server, "status", ident[:10])) == out
    data = json.loads(ok(br(server, "status", ident[:10], "--json")))
    assert data["id"] == ident and data["result"] == 42 and data["state"] == "succeeded"


def test_status_of_a_failed_job_shows_the_error(server: ServerProcess) -> None:
    ident = submit(server, "square", "--param", "x=-5")
    wait_done(server, ident)
    out = ok(br(server, "status", ident))
    assert re.search(r"^state\s+failed$", out, re.M), out
    assert "ValueError: negative: -5" in out and "traceback" in out


def test_status_alone_is_a_table(server: ServerProcess) -> None:
    a = submit(server, "add", "--param", "a=1")
    b = submit(server, "square", "--param", "x=-1")
    wait_done(server, a)
    wait_done(server, b)
    out = ok(br(server, "status"))
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATE", "ITEMS", "PROGRESS", "CREATED"]
    assert lines[1].startswith(b[:12]) and lines[2].startswith(a[:12])  # newest first
    assert "failed" in lines[1] and "succeeded" in lines[2]
    failed = ok(br(server, "status", "--state", "failed", "--task", "square"))
    assert b[:12] in failed and a[:12] not in failed
    page = json.loads(ok(br(server, "status", "--json", "--limit", "2")))
    assert [j["id"] for j in page["jobs"]] == [b, a] and page["next"] is not None
    assert error_line(br(server, "status", "--state", "bogus"), 2)


def test_status_watch_until_done(server: ServerProcess) -> None:
    ident = submit(server, "progress", "--param", "steps=3", "--param", "delay=0.05")
    r = br(server, "status", ident, "--watch")
    assert r.exit_code == 0, r.output
    assert re.search(r"^state\s+succeeded$", r.stdout, re.M)
    failing = submit(server, "square", "--param", "x=-1")
    assert br(server, "status", failing, "--watch").exit_code == 1


@pytest.mark.parametrize("ident", ["zzz", "0" * 32, "../x"])
def test_unknown_id_is_exit_2_with_the_servers_message(server: ServerProcess,
                                                       ident: str) -> None:
    for command in ("status", "wait", "cancel", "retry", "results"):
        err = error_line(br(server, command, ident), 2)
        # The server decodes %2F before routing, so "../x" is an unknown route, not an id.
        expected = "no such route" if "/" in ident else "no job with id"
        assert expected in err, (command, err)


# --------------------------------------------------------------------------- wait
def test_wait_exit_codes(server: ServerProcess) -> None:
    good = submit(server, "add", "--param", "a=1")
    r = br(server, "wait", good, "--timeout", "30")
    assert r.exit_code == 0, r.output
    bad = submit(server, "square", "--param", "x=-1")
    r = br(server, "wait", bad[:12], "--timeout", "30")
    assert r.exit_code == 1, r.output
    assert "failed" in r.stderr
    as_json = br(server, "wait", good, "--json", "--timeout", "30")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["state"] == "succeeded"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wait_draws_a_progress_bar_on_a_terminal(server: ServerProcess,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(bulkrunner.client.cli, "_stderr", lambda: term)
    ident = ok(br(server, "submit", "add", "--items", "-",
                  input="".join(f'{{"a": {i}}}\n' for i in range(5)))).strip()
    r = br(server, "wait", ident, "--timeout", "30")
    assert r.exit_code == 0, r.output
    drawn = term.getvalue()
    assert drawn.startswith("\r") and drawn.endswith("\n"), repr(drawn)
    last = drawn.rstrip().rsplit("\r", 1)[-1]
    assert "succeeded" in last and "100%" in last and "5/5" in last and "█" in last, last


def test_wait_timeout_is_exit_4_and_cancelled_is_exit_1(server: ServerProcess) -> None:
    ident = submit(server, "slow", "--param", "seconds=30")
    r = br(server, "wait", ident, "--timeout", "0.3")
    err = error_line(r, 4)
    assert ident in err and "0.3" in err
    out = ok(br(server, "cancel", ident))
    assert ident in out and "cancelled" in out
    r = br(server, "wait", ident, "--timeout", "30")
    assert r.exit_code == 1, r.output
    assert "cancelled" in r.stderr
    # Cancelling again: the server's 409 becomes exit 2 with its message.
    err = error_line(br(server, "cancel", ident), 2)
    assert "already finished" in err


# --------------------------------------------------------------------------- retry, results
def test_retry_reruns_failed_items(server: ServerProcess, tmp_path: Path) -> None:
    items = tmp_path / "flaky.jsonl"
    items.write_text("".join(json.dumps({"path": str(tmp_path / f"c{i}"),
                                         "fail_times": i % 2}) + "\n" for i in range(4)))
    ident = submit(server, "flaky", "--items", str(items), "--max-attempts", "1")
    assert br(server, "wait", ident, "--timeout", "30").exit_code == 1
    job = job_json(server, ident)
    assert job["items"]["failed"] == 2 and job["items"]["succeeded"] == 2
    out = ok(br(server, "retry", ident[:10]))
    assert "2 item(s) queued again" in out, out
    r = br(server, "wait", ident, "--timeout", "30")
    assert r.exit_code == 0, r.output
    assert [int((tmp_path / f"c{i}").read_text()) for i in range(4)] == [1, 2, 1, 2]
    err = error_line(br(server, "retry", ident), 2)
    assert "nothing" in err or "no failed" in err


def test_results_formats_and_output_file(server: ServerProcess, tmp_path: Path) -> None:
    items = tmp_path / "sq.csv"
    items.write_text("x\n1\n-2\n3\n")
    ident = submit(server, "square", "--items", str(items))
    wait_done(server, ident)
    rows = [json.loads(line) for line in ok(br(server, "results", ident)).splitlines()]
    assert [(r["index"], r["state"], r["result"]) for r in rows] == [
        (0, "succeeded", 1), (1, "failed", None), (2, "succeeded", 9)]
    out = tmp_path / "out.csv"
    r = br(server, "results", ident, "--format", "csv", "--output", str(out))
    assert ok(r) == ""
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(t["index"], t["x"], t["result"]) for t in table] == [
        ("0", "1", "1"), ("1", "-2", ""), ("2", "3", "9")]
    assert "ValueError" in table[1]["error"]
    assert "csv" in br(server, "results", ident, "--format", "xml").stderr


def test_results_errors_leave_no_file(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "never.csv"
    err = error_line(br(server, "results", "f" * 32, "--output", str(out)), 2)
    assert "no job with id" in err
    assert not out.exists(), "a failed download must not leave an empty file behind"
    ident = submit(server, "noop")
    unwritable = tmp_path / "no-such-dir" / "out.csv"
    err = error_line(br(server, "results", ident, "--output", str(unwritable)), 2)
    assert str(unwritable) in err


# --------------------------------------------------------------------------- tasks
def test_tasks(server: ServerProcess) -> None:
    out = ok(br(server, "tasks"))
    assert re.search(r"^add$", out, re.M) and "Add two integers." in out
    assert "--param a=<int>  (required)" in out and "--param b=<int>  (default 1)" in out
    assert "echo (default)" in out
    data = json.loads(ok(br(server, "tasks", "--json")))
    names = {t["name"] for t in data["tasks"]}
    assert {"add", "typed", "echo", "square"} <= names


# --------------------------------------------------------------------------- unreachable, url
def test_unreachable_server_is_exit_3(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["status", "abc"], ["submit", "add", "-p", "a=1"], ["tasks"],
                 ["wait", "abc"], ["cancel", "abc"], ["results", "abc"]):
        err = error_line(invoke(["--url", url, *args]), 3)
        assert url in err and "bulkrunner serve" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_url_from_environment(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKRUNNER_URL", server.url)
    assert invoke(["tasks", "--json"]).exit_code == 0


def test_bad_url_is_a_usage_error() -> None:
    r = invoke(["--url", "ftp://example.org", "status"])
    assert r.exit_code == 2, r.output
    assert "ftp://example.org" in r.output and "Traceback" not in r.output


def test_url_defaults_to_the_configs_host_and_port(server: ServerProcess, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.url.rsplit(":", 1)[1]
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
    assert invoke(["--config", str(cfg), "tasks"]).exit_code == 0
    monkeypatch.setenv("BULKRUNNER_CONFIG", str(cfg))
    assert invoke(["tasks"]).exit_code == 0
    (tmp_path / "bulkrunner.toml").write_text(cfg.read_text())  # ./bulkrunner.toml
    monkeypatch.delenv("BULKRUNNER_CONFIG")
    assert invoke(["tasks"]).exit_code == 0


def test_token(serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "server"  # not the cwd: the CLI would read the token from its config
    home.mkdir()
    srv = serve(toml_config(home, server='token = "s3cret"'))
    err = error_line(invoke(["--url", srv.url, "status"]), 2)
    assert "token" in err
    assert error_line(invoke(["--url", srv.url, "--token", "wrong", "tasks"]), 2)
    assert invoke(["--url", srv.url, "--token", "s3cret", "status"]).exit_code == 0
    monkeypatch.setenv("BULKRUNNER_TOKEN", "s3cret")
    ident = ok(invoke(["--url", srv.url, "submit", "add", "-p", "a=1", "--wait"])).strip()
    assert ID.match(ident)


# --------------------------------------------------------------------------- serve config
@pytest.fixture
def keep_logging() -> Iterator[None]:
    """``serve`` sets up logging on the root logger before it reads the tasks; undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("text", "key", "needle"), [
    ("[server\nport = 1\n", None, "TOML"),
    ("[server]\nprot = 8000\n", "server.prot", "port"),
    ('[server]\nport = "eighty"\n', "server.port", "eighty"),
    ("[executor]\nmax_workers = 0\n", "executor.max_workers", "at least 1"),
    ('[executor]\ntype = "gpu"\n', "executor.type", "thread"),
    ('[tasks]\nbroken = "no_such_module_xyz:run"\n', "tasks.broken", "no_such_module_xyz"),
    ('[tasks]\nbroken = "tests.sample_tasks:nope"\n', "tasks.broken", "nope"),
    ('[tasks]\nbroken = "not a path"\n', "tasks.broken", "module:function"),
    ('[tasks]\ndefault = "missing"\n', "tasks.default", "missing"),
    ('[server]\nhost = "0.0.0.0"\n', "server.token", "token"),
    ('[store]\npath = "no-such-dir/x.db"\n', "store.path", "x.db"),
    ('[store]\npath = "not-a-db.txt"\n', "store.path", "not-a-db.txt"),
])
def test_bad_config_stops_serve_with_exit_2(tmp_path: Path, keep_logging: None, text: str,
                                            key: str | None, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    (tmp_path / "not-a-db.txt").write_text("this is not an SQLite database, " * 100)
    r = invoke(["--config", str(path), "serve", "--port", "0"])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err  # one message
    assert str(path) in err and needle in err, err
    if key is not None:
        assert key in err, err
    assert not (tmp_path / "bulkrunner.db").exists()


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    r = invoke(["--config", str(tmp_path / "nope.toml"), "serve"])
    assert r.exit_code == 2 and "nope.toml" in r.stderr, r.output


# --------------------------------------------------------------------------- help
def test_help_of_every_command() -> None:
    top = invoke(["--help"])
    assert top.exit_code == 0
    commands = sorted(cli.commands)  # type: ignore[attr-defined]
    assert {"serve", "submit", "status", "wait", "cancel", "retry", "results",
            "tasks"} <= set(commands)
    for name in commands:
        assert name in top.stdout
        r = invoke([name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert r.stdout.startswith(f"Usage: cli {name}") or "Usage:" in r.stdout
        command = cli.commands[name]  # type: ignore[attr-defined]
        assert isinstance(command, click.Command) and command.help, f"{name} has no help"
        assert command.help.split("\n")[0].strip() in " ".join(r.stdout.split())


# --------------------------------------------------------------------------- a real process
def test_status_as_a_real_process(server: ServerProcess) -> None:
    ident = submit(server, "add", "--param", "a=20", "--param", "b=22")
    wait_done(server, ident)
    proc = run_cli("status", ident[:8], url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^state\s+succeeded$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^result\s+42$", proc.stdout, re.M), proc.stdout
    missing = run_cli("status", "f" * 32, url=server.url)
    assert missing.returncode == 2 and "no job with id" in missing.stderr
    assert "Traceback" not in missing.stderr
