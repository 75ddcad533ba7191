"""Every shell and Python example of the README runs as written, against a real server.

The test reads README.md top to bottom, as a newcomer would, in one scratch directory:

- a block whose first line names a file (``# myapp/images.py``, ``# bulkrunner.toml``) is
  written there (Python files are compiled too; the server imports the task modules);
- a ``sh`` block runs line by line in bash, its variables (``ID=$(...)``) kept from line to
  line and block to block as in one terminal. A line must exit 0, or with a code its comment
  names (``bulkrunner wait $ID   # exit 1 when items failed``);
- ``bulkrunner serve`` starts the server in the background on a free port, stopping the one
  before, and the CLI lines that follow find it through ``$BULKRUNNER_URL``;
- a ``python`` block runs as a script (``127.0.0.1:8470`` pointing at that server).

Blocks of other languages (toml, text, yaml, ...) are not run, except as files. What a
block presumes that the README does not show (an input file, an unfinished job to pause) is
set up by :data:`GIVEN` just before it. A block that cannot run here is in :data:`SKIP` with
its reason. Both are keyed by the heading a block is under and a string in it, so blocks may
move; an entry that no longer matches any block fails the test, and so does a new block
that does not run: make it run as written (preferred), or give it an entry with a reason.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env, free_port, wait_for

README = ROOT / "README.md"
SHELL = ("sh", "bash", "shell")
LINE_TIMEOUT = 90  # seconds for one line or one Python block


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    lang: str
    text: str
    line: int                   # of its opening fence, from 1
    headings: tuple[str, ...]   # the headings it is under, outermost first

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({' > '.join(self.headings)})"

    def under(self, heading: str, marker: str) -> bool:
        """Whether the block is under ``heading`` (at any level) and holds ``marker``."""
        return heading in self.headings and marker in self.text

    @property
    def file(self) -> str | None:
        """The file a block holds, when its first line names one (``# myapp/images.py``)."""
        first = self.text.split("\n", 1)[0]
        m = re.fullmatch(r"# ([\w./-]+\.(?:py|toml|csv|jsonl|json|txt))", first.strip())
        return m.group(1) if m else None


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the headings each is under (``#`` lines
    inside blocks are not headings); an indented block (in a list item) is dedented."""
    lines = text.splitlines()
    heads: list[str] = []
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        head = re.match(r"^(#{1,6}) (.+)$", lines[i])
        if head:
            heads = [*heads[:len(head.group(1)) - 1], head.group(2).strip()]
        elif fence:
            indent, lang = len(fence.group(1)), fence.group(2)
            end = next((j for j in range(i + 1, len(lines))
                        if re.match(r"^\s*```\s*$", lines[j])), None)
            assert end is not None, f"README.md:{i + 1}: a block that never closes"
            body = "\n".join(line[indent:] if line[:indent].strip() == "" else line.lstrip()
                             for line in lines[i + 1:end])
            out.append(Block(lang, body, i + 1, tuple(heads[1:] or heads)))
            i = end
        i += 1
    return out


# ------------------------------------------------------------------ what is not run, and why
@dataclass(frozen=True)
class Skip:
    heading: str
    marker: str
    reason: str


SKIP = (
    Skip("Quick start", "pytest", "runs the whole test suite, of which this test is part"),
    Skip("Development", "pytest", "the whole test suite, lint (tests/test_lint.py runs it) and "
         "the benchmarks at full size, which tests never run"),
    Skip("Inside your Flask app", "gunicorn -w 4", "four gunicorn workers on a fixed port; "
         "tests/test_gunicorn.py runs this recipe on a free one"),
    Skip("Inside your Flask app", "current_user.is_staff", "a fragment of the reader's own "
         "app: `current_user` comes from their login extension"),
    Skip("Scaling out with Dask", 'pip install "bulkrunner[dask]"', "installs from PyPI"),
    Skip("Several machines", "dask scheduler --host 10.0.0.5", "needs cluster machines at "
         "10.0.0.5 and TLS certificates under /etc/dask"),
    Skip("Several machines", "DASK_DISTRIBUTED__COMM__TLS__CA_FILE", "needs the external "
         "scheduler above and its certificates under /etc/dask"),
)

#: Lines changed before they run: (pattern, replacement, reason).
REWRITES = (
    (r"^pip install -e \. && ", "", "the tests run where bulkrunner is installed already (the "
     "walk on a fresh clone in a fresh venv installs it)"),
    (r"\b(?:localhost|127\.0\.0\.1):8470\b", "127.0.0.1:{port}", "the test's server listens "
     "on a free port, not the default 8470"),
    (r"/run/secrets/bulkrunner-hook", "{secret}", "a system path: the test writes the "
     "webhook secret to a file of its own"),
)


@dataclass(frozen=True)
class Given:
    """What a block presumes that the README does not show, set up just before it runs
    (``files`` written, ``lines`` run as its own lines are), or checked just after it
    (``then``: Python run in the block's directory; for a file block, what makes it run)."""

    heading: str
    marker: str
    reason: str
    files: dict[str, str] = field(default_factory=dict)
    append: dict[str, str] = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    then: str = ""


WEBHOOK_CHECK = '''
import hashlib, hmac, json
body = json.dumps({"event": "job.finished", "job": {"id": "j1", "state": "failed"}}).encode()
sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
c = app.test_client()
headers = {"X-Bulkrunner-Delivery": "d1", "Content-Type": "application/json"}
r = c.post("/bulk", data=body, headers={**headers, "X-Bulkrunner-Signature": sig})
assert r.status_code == 204, (r.status_code, r.get_data(as_text=True))
r = c.post("/bulk", data=body, headers={**headers, "X-Bulkrunner-Signature": "sha256=00"})
assert r.status_code == 401, r.status_code
'''

EMBED_CHECK = '''
import time
from myapp import app, runner
c = app.test_client()
r = c.post("/thumbnails", json={"paths": ["a.png", "b.png"]})
assert r.status_code == 202, (r.status_code, r.get_data(as_text=True))
ident = r.get_json()["id"]
deadline = time.monotonic() + 30
while True:
    got = c.get(f"/thumbnails/{ident}").get_json()
    if got == {"state": "succeeded", "done": 2}:
        break
    assert time.monotonic() < deadline, f"the thumbnails job did not finish: {got}"
    time.sleep(0.05)
with app.app_context():
    assert runner.get(ident)["items"]["succeeded"] == 2
assert c.get("/bulkrunner/healthz").status_code == 200
'''

GIVEN = (
    Given("Bulk jobs", "--items images.csv", "the files the example reads; one row names an "
          "image that is not there, so that `wait` reports a failure and `retry` has an item "
          "to run again",
          files={"images.csv": "path,width\na.png,\nb.png,1200\nnot-there.png,\n",
                 "a.png": "not really a PNG\n", "b.png": "nor is this\n",
                 "items.jsonl": '{"path": "a.png"}\n{"path": "b.png", "mode": "fill"}\n'}),
    Given("Pacing: limits, fair share, pause, start later", "pause --task geocode",
          "the Pacing config's geocode task (its module is not shown), and an unfinished job "
          "in $ID to pause",
          files={"myapp/geo.py": 'def lookup(address: str) -> dict:\n'
                                 '    """Geocode one address."""\n'
                                 '    return {"address": address}\n'},
          append={"bulkrunner.toml": '\n[tasks.geocode]\npath = "myapp.geo:lookup"\n'
                                     'concurrency = 2\nrate_limit = "20/s"\n'},
          lines=("bulkrunner serve",
                 "ID=$(bulkrunner submit geocode --param address=Oslo --delay 10m)")),
    Given("Per-item logs", "bulkrunner logs $ID", "a finished bulk job of ten items in $ID",
          lines=("ID=$(printf '{\"n\": %s}\\n' 0 1 2 3 4 5 6 7 8 9 | bulkrunner submit echo "
                 "--items -)", "bulkrunner wait $ID")),
    Given("Webhooks", "X-Bulkrunner-Signature", "the receiver answers a signed delivery 204 "
          "and a badly signed one 401", then=WEBHOOK_CHECK),
    Given("Inside your Flask app", "from bulkrunner.flask import BulkRunner", "the app runs "
          "its thumbnails job to the end (through its own routes, the Flask test client)",
          then=EMBED_CHECK),
)

#: Sections whose examples are another project than the README's main one.
SECTION_DIRS = {"Inside your Flask app": "embed"}


# ------------------------------------------------------------------------------ the runner
class Stuck(Exception):
    """The story cannot go on (its server did not start): later examples would all fail."""


class Story:
    """The README's examples run in order in one directory, as in one terminal."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        shim = self.bin / "bulkrunner"  # the tree under test, whatever is on $PATH
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m bulkrunner \"$@\"\n")
        shim.chmod(0o755)
        (self.bin / "python").symlink_to(sys.executable)
        self.state = tmp / "shell-state.sh"
        self.secret = tmp / "hook-secret"
        self.secret.write_text("s3cret\n")
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log: Path | None = None
        self.port = 0
        self.names: set[str] = set()   # shell variables the examples set
        self.failures: list[str] = []
        self.trace: list[str] = []     # what ran, printed (pytest shows it on a failure)

    def directory(self, block: Block) -> Path:
        d = self.tmp / next((v for k, v in SECTION_DIRS.items() if k in block.headings),
                            "project")
        d.mkdir(exist_ok=True)
        return d

    def env(self) -> dict[str, str]:
        env = child_env({"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"})
        if self.port:
            env["BULKRUNNER_URL"] = f"http://127.0.0.1:{self.port}"
        return env

    def rewrite(self, text: str) -> str:
        for pattern, repl, _ in REWRITES:
            text = re.sub(pattern, repl.format(port=self.port, secret=self.secret), text,
                          flags=re.M)
        return text

    def fail(self, block: Block, what: str) -> None:
        log = self.server_log.read_text()[-3000:] if self.server_log else ""
        self.failures.append(f"{block.where}: {what}\n--- server log (tail) ---\n{log}")

    # ---------------------------------------------------------------- the server
    def serve(self, block: Block, line: str, cwd: Path) -> None:
        self.stop()
        self.port = free_port()
        self.server_log = self.tmp / f"server-{self.port}.log"
        args = shlex.split(line.split(" #", 1)[0])[1:]
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(
                [str(self.bin / "bulkrunner"), *args, "--port", str(self.port)], cwd=cwd,
                env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log_path, proc = self.server_log, self.server

        def ready() -> bool:
            if proc.poll() is not None:
                raise Stuck(f"{block.where}: `{line}` exited {proc.returncode}:\n"
                            f"{log_path.read_text()}")
            return "serving on http://" in log_path.read_text()
        try:
            wait_for(ready, 60, f"{block.where}: `{line}` to serve")
        except AssertionError as e:
            raise Stuck(str(e)) from None

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
        self.server = None

    # ---------------------------------------------------------------- shell lines
    def run_line(self, block: Block, line: str, cwd: Path) -> None:
        if re.match(r"^bulkrunner serve\b", line):
            self.serve(block, line, cwd)
            self.trace.append(f"{block.where}: serving on port {self.port}: {line}")
            return
        self.names.update(re.findall(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=", line, re.M))
        names = " ".join(sorted(self.names))
        script = (f'[ -f {shlex.quote(str(self.state))} ] && . {shlex.quote(str(self.state))}\n'
                  f"{line}\n__rc=$?\n"
                  + (f"declare -p {names} > {shlex.quote(str(self.state))} 2>/dev/null\n"
                     if names else "")
                  + "exit $__rc\n")
        try:
            r = subprocess.run(["bash", "-c", script], cwd=cwd, env=self.env(),
                               capture_output=True, text=True, timeout=LINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(block, f"`{line}` did not end within {LINE_TIMEOUT} s")
            return
        allowed = {0, *(int(n) for n in re.findall(r"\bexit (\d+)", comment(line)))}
        self.trace.append(f"{block.where}: exit {r.returncode}: {line}")
        if r.returncode not in allowed:
            self.fail(block, f"`{line}` exited {r.returncode} (allowed: {sorted(allowed)})\n"
                             f"--- stdout ---\n{r.stdout[-2000:]}\n--- stderr ---\n"
                             f"{r.stderr[-2000:]}")

    def run_python(self, block: Block, code: str, cwd: Path) -> None:
        try:
            r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=self.env(),
                               capture_output=True, text=True, timeout=LINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(block, f"the Python example did not end within {LINE_TIMEOUT} s")
            return
        self.trace.append(f"{block.where}: exit {r.returncode}: python ({len(code)} chars)")
        if r.returncode != 0:
            self.fail(block, f"the Python example exited {r.returncode}\n--- stdout ---\n"
                             f"{r.stdout[-2000:]}\n--- stderr ---\n{r.stderr[-3000:]}")

    # ---------------------------------------------------------------- one block
    def run(self, block: Block) -> None:
        cwd = self.directory(block)
        given = [g for g in GIVEN if block.under(g.heading, g.marker)]
        for g in given:
            for name, content in g.files.items():
                (cwd / name).parent.mkdir(parents=True, exist_ok=True)
                (cwd / name).write_text(content)
            for name, content in g.append.items():
                with open(cwd / name, "a") as f:
                    f.write(content)
            for line in g.lines:
                self.run_line(block, line, cwd)
        if block.file is not None:
            path = cwd / block.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text + "\n")
            if path.suffix == ".py":
                try:
                    compile(block.text, str(path), "exec")
                except SyntaxError as e:
                    self.fail(block, f"{block.file} does not compile: {e}")
        elif block.lang in SHELL:
            for line in logical_lines(block.text):
                self.run_line(block, self.rewrite(line), cwd)
        elif block.lang == "python":
            code = self.rewrite(block.text)
            self.run_python(block, code + "".join("\n" + g.then for g in given), cwd)
            return
        for g in given:
            if g.then:
                self.run_python(block, g.then, cwd)


def comment(line: str) -> str:
    """The comment at the end of a shell line ('' when none): from a ``#`` that starts a
    word outside quotes."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1:]
    return ""


def logical_lines(text: str) -> Iterator[str]:
    """The commands of a shell block: continued lines joined, blank and comment lines left
    out."""
    pending = ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            yield line


def runnable(block: Block) -> bool:
    return block.file is not None or block.lang in (*SHELL, "python")


def skipped(block: Block) -> Skip | None:
    return next((s for s in SKIP if block.under(s.heading, s.marker)), None)


# ------------------------------------------------------------------------------- the tests
BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_examples_to_run() -> None:
    shells = [b for b in BLOCKS if b.lang in SHELL and not skipped(b)]
    pythons = [b for b in BLOCKS if b.lang == "python" and not skipped(b)]
    assert len(shells) >= 8 and len(pythons) >= 4, (len(shells), len(pythons))


@pytest.mark.parametrize("entry", [*SKIP, *GIVEN], ids=lambda e: f"{e.heading}: {e.marker}")
def test_every_skip_and_given_names_a_block(entry: Skip | Given) -> None:
    found = [b for b in BLOCKS if b.under(entry.heading, entry.marker)]
    assert found, (f"no README block under {entry.heading!r} holds {entry.marker!r} any more: "
                   "drop or update the entry")
    assert all(runnable(b) for b in found), [b.where for b in found]


def test_every_rewrite_is_used() -> None:
    text = "\n".join(b.text for b in BLOCKS if runnable(b) and not skipped(b))
    for pattern, _, reason in REWRITES:
        assert re.search(pattern, text, re.M), f"no example needs {pattern!r} ({reason})"


def test_the_readme_examples_run_as_written(tmp_path: Path) -> None:
    story = Story(tmp_path)
    ran = 0
    try:
        for block in BLOCKS:
            if not runnable(block) or skipped(block):
                continue
            before = len(story.failures)
            started = time.monotonic()
            try:
                story.run(block)
            except Stuck as e:
                story.failures.append(f"{e}\n(the later examples were not run)")
                break
            ran += 1
            if len(story.failures) > before:
                story.failures[-1] += f"\n(after {time.monotonic() - started:.1f} s)"
    finally:
        story.stop()
        print("\n".join(story.trace))
    assert not story.failures, (f"{len(story.failures)} of {ran} README examples did not run "
                                "as written:\n\n" + "\n\n".join(story.failures))
