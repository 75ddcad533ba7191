"""What the CLI prints: server text with control characters cannot drive the terminal, and
bulkrunner's errors come out as ``error: <message>`` with its exit code.

A real server (started once for the module) reproduces the terminal-escape finding with the
builtin ``fail`` task; the error mapping for answers a test server cannot easily give (5xx,
a download cut off halfway, a multi-field refusal) uses a stand-in for the HTTP client.
"""

from __future__ import annotations

import io
import json
import re
import socket
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import bulkrunner.client.cli as cli_module
import bulkrunner.client.options as options_module
import bulkrunner.client.reading as reading_module
from bulkrunner.client import display
from bulkrunner.client.api import Download, LogChunk
from bulkrunner.client.cli import cli, main
from bulkrunner.client.exits import CliError, ServerError, WaitTimeout, translate
from bulkrunner.errors import (
    ApiError,
    BulkrunnerError,
    ConfigError,
    ServerUnreachable,
)
from tests.conftest import ServerProcess, toml_config, wait_for

HOSTILE = "\x1b]0;PWNED\x07\x1b[31mRED\x9b2J\x7f\rEND"
ESCAPED = "\\x1b]0;PWNED\\x07\\x1b[31mRED\\x9b2J\\x7f\\x0dEND"
# Every control character (category Cc) but newline and tab.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def no_control(text: str, allow: str = "") -> bool:
    return not any(CONTROL.match(c) and c not in allow for c in text)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray ./bulkrunner.toml or $BULKRUNNER_* from the environment."""
    for name in ("BULKRUNNER_URL", "BULKRUNNER_TOKEN", "BULKRUNNER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def invoke(args: list[str], input: str | bytes | None = None) -> Result:
    """Run the CLI in-process; an exception other than SystemExit fails the test."""
    return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)


def error_of(result: Result, code: int) -> str:
    """Check the exit code, and that stderr is ``error: ...`` with no usage and no traceback;
    return the message after ``error: ``."""
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    err = result.stderr
    assert err.startswith("error: ") and err.endswith("\n"), repr(err)
    assert "Traceback" not in err and "Usage:" not in err, err
    return err.removeprefix("error: ").removesuffix("\n")


# --------------------------------------------------------------------------- display.clean
def test_clean_escapes_exactly_the_control_characters_but_newline_and_tab() -> None:
    for i in range(0x3000):
        c = chr(i)
        if unicodedata.category(c) == "Cc" and c not in "\n\t":
            assert display.clean(c) == f"\\x{i:02x}", hex(i)
        else:
            assert display.clean(c) == c, hex(i)
    assert display.clean(HOSTILE) == ESCAPED
    assert display.clean(ESCAPED) == ESCAPED  # idempotent
    assert display.clean("a\tb\nc ✓ é") == "a\tb\nc ✓ é"


def _job(**over: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": "0123456789abcdef0123456789abcdef", "task": "fail", "state": "failed",
        "items": {"total": 1, "succeeded": 0, "failed": 1, "running": 0, "queued": 0,
                  "cancelled": 0},
        "progress": 1.0, "params": {"message": HOSTILE}, "message": None,
        "created_at": "2024-01-02T03:04:05Z", "started_at": None, "finished_at": None,
        "result": None, "error": None,
    }
    job.update(over)
    return job


def test_summary_shows_every_server_field_escaped() -> None:
    text = display.summary(_job(
        task=f"t{HOSTILE}", state=f"failed{HOSTILE}", message=HOSTILE, result=HOSTILE,
        created_at=HOSTILE, finished_at=HOSTILE,
        error={"type": f"Runtime{HOSTILE}", "message": HOSTILE,
               "traceback": f"Traceback:\n  line one\x1cstill one\nRuntimeError: {HOSTILE}\n"}))
    assert no_control(text, "\n"), repr(text)
    assert text.count(ESCAPED) >= 8, text
    # A control character in the traceback is shown, not taken for a line break.
    assert "    line one\\x1cstill one" in text.splitlines(), text
    assert f"  RuntimeError: {ESCAPED}" in text.splitlines(), text


def test_table_and_progress_line_escape_server_text() -> None:
    jobs = [_job(task=HOSTILE), _job(id=HOSTILE * 3, state=HOSTILE)]
    text = display.table(jobs)
    assert no_control(text, "\n"), repr(text)
    lines = text.splitlines()
    # Columns still line up: widths are those of the escaped text.
    assert lines[1].index("failed") == lines[0].index("STATE"), text
    bar = display.ProgressLine(tty=True)
    drawn = bar.update(_job(state="running", message=HOSTILE, progress=0.5))
    assert drawn is not None and drawn.startswith("\r") and no_control(drawn[1:]), repr(drawn)
    assert "\\x1b]0;PWNED" in drawn
    plain = display.ProgressLine(tty=False).update(_job(message=HOSTILE))
    assert plain is not None and no_control(plain, "\n") and "PWNED" in plain


# --------------------------------------------------------------------------- a real job
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(toml_config(tmp_path_factory.mktemp("cli-output-server")))
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hostile_job(server: ServerProcess) -> str:
    """A finished job of the builtin ``fail`` task whose error message is :data:`HOSTILE`."""
    r = CliRunner().invoke(cli, ["--url", server.url, "submit", "fail", "--param",
                                 f"message:={json.dumps(HOSTILE)}"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ident = r.stdout.strip()

    def done() -> bool:
        got = CliRunner().invoke(cli, ["--url", server.url, "status", ident, "--json"])
        return bool(json.loads(got.stdout)["state"] == "failed")

    wait_for(done, 30, f"job {ident} did not fail")
    return ident


def test_status_of_a_job_whose_error_holds_terminal_escapes(server: ServerProcess,
                                                             hostile_job: str) -> None:
    r = invoke(["--url", server.url, "status", hostile_job])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout, repr(r.stdout)
    assert no_control(r.stdout, "\n"), repr(r.stdout)
    assert f"RuntimeError: {ESCAPED}" in r.stdout, r.stdout  # the error line
    assert f"  RuntimeError: {ESCAPED}" in r.stdout.splitlines(), r.stdout  # the traceback
    assert "PWNED" in r.stdout and "RED" in r.stdout


def test_wait_on_a_job_whose_error_holds_terminal_escapes(
        server: ServerProcess, hostile_job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = invoke(["--url", server.url, "wait", hostile_job, "--timeout", "30"])
    assert r.exit_code == 1, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output, repr(r.output)
    assert no_control(r.output, "\n"), repr(r.output)
    assert "PWNED" in r.stderr and "RED" in r.stderr and ESCAPED in r.stderr, r.stderr

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(cli_module, "_stderr", lambda: term)
    r = invoke(["--url", server.url, "wait", hostile_job, "--timeout", "30"])
    assert r.exit_code == 1, r.output
    assert no_control(term.getvalue(), "\r\n") and no_control(r.output, "\n")


def test_json_output_escapes_control_characters(server: ServerProcess,
                                                hostile_job: str) -> None:
    for args, code in ((["status", hostile_job, "--json"], 0),
                       (["wait", hostile_job, "--json", "--timeout", "30"], 1),
                       (["status", "--json"], 0)):
        r = invoke(["--url", server.url, *args])
        assert r.exit_code == code, (args, r.output)
        assert no_control(r.stdout, "\n"), (args, r.stdout)  # ensure_ascii: \u001b, \u009b
        data = json.loads(r.stdout)
        job = data["jobs"][0] if "jobs" in data else data
        assert job["error"]["message"] == HOSTILE  # escaped in JSON, not changed
    # A failed job under --json: the JSON on stdout, exit 1, and no "error:" line.
    assert "error:" not in r.stderr


def test_results_are_data_on_a_pipe_and_escaped_on_a_terminal(
        server: ServerProcess, hostile_job: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    piped = invoke(["--url", server.url, "results", hostile_job, "--format", "csv"])
    assert piped.exit_code == 0, piped.output
    assert HOSTILE.replace("\r", "") in piped.stdout.replace("\r", "")  # byte for byte
    out = tmp_path / "out.csv"
    r = invoke(["--url", server.url, "results", hostile_job, "--format", "csv", "-o", str(out)])
    assert r.exit_code == 0 and out.read_bytes() == piped.stdout_bytes
    monkeypatch.setattr(reading_module, "_stdout_isatty", lambda: True)
    shown = invoke(["--url", server.url, "results", hostile_job, "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    assert no_control(shown.stdout, "\n") and "\\x1b]0;PWNED\\x07" in shown.stdout


# --------------------------------------------------------------------------- a stand-in client
@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``fake_client(job=..., tasks=ApiError(...))``: the CLI's Client becomes a stand-in
    whose methods return the value given (or call it, or raise it if it is an exception)."""
    def install(**methods: Any) -> None:
        class Fake:
            def __init__(self, url: str, token: str | None = None) -> None:
                self.url = url

            def close(self) -> None:
                pass

        def method(behaviour: Any) -> Callable[..., Any]:
            def call(self: Fake, *args: Any, **kwargs: Any) -> Any:
                if isinstance(behaviour, BaseException):
                    raise behaviour
                return behaviour(*args, **kwargs) if callable(behaviour) else behaviour
            return call

        for name, behaviour in methods.items():
            setattr(Fake, name, method(behaviour))
        monkeypatch.setattr(options_module, "Client", Fake)
    return install


URL = ["--url", "http://127.0.0.1:9"]


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_is_exit_3(fake_client: Callable[..., None], status: int) -> None:
    down = ApiError(status, "shutting_down", "the server is shutting down")
    fake_client(job=down, wait=down)
    for command in (["status", "abc"], ["wait", "abc"]):
        msg = error_of(invoke([*URL, *command]), 3)
        assert msg == "the server cannot take this now: the server is shutting down"


def test_a_refusal_naming_several_fields_lists_them(fake_client: Callable[..., None]) -> None:
    fields = {"params.a": "required", "params.zz": "not a param of add"}
    fake_client(tasks={"tasks": [], "default": None},
                submit=ApiError(422, "invalid_submission", "params.a: required; ...",
                                {"fields": fields}))
    r = invoke([*URL, "submit", "add", "-p", "zz=1"])
    assert error_of(r, 2) == ("the server refused the submission:\n"
                              "  params.a: required\n  params.zz: not a param of add")
    assert r.stdout == ""
    fake_client(submit=ApiError(422, "invalid_submission", "params.a: required",
                                {"fields": {"params.a": "required"}}))
    assert error_of(invoke([*URL, "submit", "add"]), 2) == "params.a: required"


def test_other_bulkrunner_errors_are_exit_2(fake_client: Callable[..., None]) -> None:
    fake_client(cancel=BulkrunnerError("something bulkrunner refuses"),
                retry=ConfigError("bad value", file="x.toml", key="jobs.max"))
    assert error_of(invoke([*URL, "cancel", "abc"]), 2) == "something bulkrunner refuses"
    assert error_of(invoke([*URL, "retry", "abc"]), 2) == "file x.toml, key jobs.max: bad value"


def test_a_config_error_in_a_client_command_is_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text("[server]\nport = \"eighty\"\n")
    msg = error_of(invoke(["--config", str(cfg), "status"]), 2)
    assert str(cfg) in msg and "server.port" in msg, msg


def test_a_download_cut_off_halfway_is_exit_3_and_leaves_no_file(
        fake_client: Callable[..., None], tmp_path: Path) -> None:
    class Response:
        def __init__(self) -> None:
            self.reads = 0

        def read(self, n: int = -1) -> bytes:
            self.reads += 1
            if self.reads > 1:
                raise ConnectionResetError("reset by peer")
            return b'{"index": 0}\n'

        def close(self) -> None:
            pass

    fake_client(results=lambda ident, fmt: Download(Response()))  # type: ignore[arg-type]
    out = tmp_path / "out.jsonl"
    msg = error_of(invoke([*URL, "results", "abc", "-o", str(out)]), 3)
    assert "cut off after 13 bytes" in msg, msg
    assert not out.exists()


def test_server_messages_are_escaped_too(fake_client: Callable[..., None]) -> None:
    fake_client(job=ApiError(404, "not_found", f"no job with id {HOSTILE!s}"))
    r = invoke([*URL, "status", "abc"])
    assert error_of(r, 2) == f"no job with id {ESCAPED}"
    assert no_control(r.stderr, "\n")


def test_timeout_is_a_wait_timeout_exception(fake_client: Callable[..., None]) -> None:
    def wait(ident: str, **kwargs: Any) -> Any:
        raise TimeoutError(f"job {ident} is still running after 0.5 s")

    fake_client(wait=wait)
    assert error_of(invoke([*URL, "wait", "abc", "--timeout", "0.5"]), 4) == (
        "job abc is still running after 0.5 s")


def test_tasks_listing_and_short_lines_escape_server_text(
        fake_client: Callable[..., None]) -> None:
    hostile = {"id": f"id{HOSTILE}", "items": {"cancelled": 1, "queued": 2}}
    fake_client(
        tasks={"default": HOSTILE, "tasks": [
            {"name": HOSTILE, "doc": f"  {HOSTILE} first\nsecond", "params": [
                {"name": HOSTILE, "type": "str", "required": False, "default": HOSTILE,
                 "choices": [HOSTILE]}]}]},
        cancel=hostile, retry=hostile, submit=hostile,
        prune={"dry_run": True, "jobs": {HOSTILE: 1}, "items": {HOSTILE: 2}})
    for args in (["tasks"], ["cancel", "x"], ["retry", "x"], ["submit", "-p", "a:=1"],
                 ["prune", "--dry-run"]):
        r = invoke([*URL, *args])
        assert r.exit_code == 0, (args, r.output)
        assert no_control(r.output, "\n") and "PWNED" in r.stdout, (args, r.stdout)
    out = invoke([*URL, "tasks"]).stdout.splitlines()
    assert out[0] == f"{ESCAPED} (default)" and out[1] == f"    {ESCAPED} first", out


def test_logs_keep_newlines_and_tabs_and_escape_the_rest(
        fake_client: Callable[..., None]) -> None:
    text = f"line\tone\n{HOSTILE}\n✓ done\n".encode()
    split = text.index("✓".encode()) + 1  # inside the three bytes of the check mark
    chunks = [LogChunk(text[:split], split, "running"),
              LogChunk(text[split:] + b"\xff\n", len(text) + 2, "succeeded")]

    def item_log(ident: str, index: int, *, after: int) -> LogChunk:
        return chunks.pop(0)

    fake_client(item_log=item_log)
    r = invoke([*URL, "logs", "abc", "--follow"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"line\tone\n{ESCAPED}\n✓ done\n\\xff\n", repr(r.stdout)
    assert not chunks  # followed until the item finished


# --------------------------------------------------------------------------- the classes
def test_translate_maps_each_error_to_its_exit_code() -> None:
    cases: list[tuple[BulkrunnerError, type[CliError], int]] = [
        (ServerUnreachable("down"), ServerError, 3),
        (ApiError(502, "http_error", "bad gateway"), ServerError, 3),
        (ApiError(404, "not_found", "no job"), CliError, 2),
        (ApiError(401, "unauthorized", "token"), CliError, 2),
        (ConfigError("bad"), CliError, 2),
        (BulkrunnerError("other"), CliError, 2),
    ]
    for error, cls, code in cases:
        got = translate(error)
        assert type(got) is cls and got.exit_code == code, (error, got)
        assert isinstance(got, click.ClickException)
    assert WaitTimeout("t").exit_code == 4


def test_cli_error_show_prints_error_prefix() -> None:
    buf = io.StringIO()
    CliError(f"bad {HOSTILE}").show(buf)
    assert buf.getvalue() == f"error: bad {ESCAPED}\n"


def test_main_is_the_entry_point_with_the_exit_codes(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(sys, "argv", ["bulkrunner", "--url", f"http://127.0.0.1:{port}",
                                      "status"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 3
    assert capsys.readouterr().err.startswith("error: cannot reach the bulkrunner server")
    monkeypatch.setattr(sys, "argv", ["bulkrunner", "status", "--state", "bogus"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "Usage: bulkrunner status" in capsys.readouterr().err  # click's own usage errors
