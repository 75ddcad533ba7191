"""Where task modules are imported from: the config file's directory, the working directory
and ``[tasks] pythonpath``, on the server and in the process executor's workers; and the two
import errors told apart (a module not found vs a dependency of it not installed)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkrunner.config import load_config
from bulkrunner.errors import ConfigError
from bulkrunner.server.tasks import Registry
from tests.conftest import child_env, cli_command, run_cli, toml_config, wait_for, wait_job

TASK_SOURCE = '''
import os

def where(tag: str = "") -> dict:
    """Which file and process ran this."""
    return {"file": __file__, "pid": os.getpid(), "tag": tag}
'''


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``sys.path`` is restored after the test, and modules it imported are forgotten."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if not name.startswith(("bulkrunner", "tests")):
            del sys.modules[name]


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class _Server:
    """``bulkrunner --config CONFIG serve`` run from ``cwd`` (not the config's directory)."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.log_path = config.parent / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cli_command("--config", str(config), "serve"), cwd=cwd,
                                     env=child_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True)

        def ready() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()}")
            m = re.search(r"serving on (http://\S+)", self.log_path.read_text())
            return m.group(1) if m else None

        try:
            self.url: str = wait_for(ready, 60, "the server to start")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_serve_imports_a_module_beside_the_config_from_another_directory(
        tmp_path: Path, executor: str) -> None:
    from bulkrunner.client import Client

    confdir, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    confdir.mkdir()
    elsewhere.mkdir()
    (confdir / "mytasks.py").write_text(TASK_SOURCE)
    cfg = toml_config(confdir, executor=executor, max_workers=1,
                      tasks={"where": "mytasks:where"})
    server = _Server(cfg, cwd=elsewhere)
    try:
        with Client(server.url) as c:
            job = c.submit("where", {"tag": executor})
            done = wait_job(c, job["id"], 60)
    finally:
        server.stop()
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert Path(result["file"]).resolve() == (confdir / "mytasks.py").resolve()
    assert result["tag"] == executor
    if executor == "process":  # it ran in a worker process, which imported it too
        assert result["pid"] != server.proc.pid


def test_a_pythonpath_entry_is_imported_from_in_a_process_worker(tmp_path: Path) -> None:
    from bulkrunner.client import Client

    (tmp_path / "lib" / "pkg").mkdir(parents=True)
    (tmp_path / "lib" / "pkg" / "__init__.py").write_text("")
    (tmp_path / "lib" / "pkg" / "jobs.py").write_text(TASK_SOURCE)
    cfg = toml_config(tmp_path, executor="process", max_workers=1,
                      tasks={"where": "pkg.jobs:where"}, extra='pythonpath = ["lib"]')
    server = _Server(cfg, cwd=tmp_path / "lib" / "pkg")  # not a directory on the path
    try:
        with Client(server.url) as c:
            done = wait_job(c, c.submit("where")["id"], 60)
    finally:
        server.stop()
    assert done["state"] == "succeeded", done
    assert Path(done["result"]["file"]).resolve() == (tmp_path / "lib/pkg/jobs.py").resolve()


def test_import_dirs_go_first_in_order_and_once(tmp_path: Path, clean_imports: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    for d in ("cwd", "a", "b"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(cwd)
    name = _unique("fromb")
    (tmp_path / "b" / f"{name}.py").write_text(TASK_SOURCE)
    cfg_path = toml_config(tmp_path, tasks={"where": f"{name}:where"},
                           extra=f'pythonpath = ["a", "{tmp_path / "b"}", "a"]')
    cfg = load_config(cfg_path)
    want = [str(tmp_path.resolve()), str(cwd.resolve()), str((tmp_path / "a").resolve()),
            str((tmp_path / "b").resolve())]
    assert cfg.pythonpath == tuple(want[2:])
    assert "pythonpath" not in {t.name for t in cfg.tasks}
    sys.path.insert(5, want[1])  # already on the path: moved, not doubled
    reg = Registry.from_config(cfg)
    assert "where" in reg
    assert sys.path[:4] == want
    assert [p for p in sys.path if p in want] == want
    Registry.from_config(cfg)  # again: still once each
    assert [p for p in sys.path if p in want] == want


@pytest.mark.parametrize("value, words", [
    ('["nope"]', "does not exist"),
    ('["mytasks.py"]', "is not a directory"),
    ('"lib"', "must be a list of directories"),
    ("[1]", "must be a list of directories"),
])
def test_a_bad_pythonpath_is_a_config_error(tmp_path: Path, value: str, words: str) -> None:
    (tmp_path / "mytasks.py").write_text(TASK_SOURCE)
    cfg = toml_config(tmp_path, tasks={"where": "mytasks:where"},
                      extra=f"pythonpath = {value}")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.key == "tasks.pythonpath" and words in e.value.message
    if "exist" in words:
        assert str(tmp_path.resolve() / "nope") in e.value.message
    r = run_cli("--config", str(cfg), "serve")
    assert r.returncode == 2, r.stderr
    assert "tasks.pythonpath" in r.stderr and words in r.stderr


def test_a_missing_module_names_the_directories_searched(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "lib").mkdir()
    cfg = toml_config(conf, tasks={"resize": "mytasks:resize"}, extra='pythonpath = ["../lib"]')
    r = run_cli("--config", str(cfg), "serve", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())  # the message may be wrapped
    assert (f"file {cfg}, key tasks.resize: cannot import module 'mytasks': no module "
            "named 'mytasks'") in err
    dirs = f"{conf.resolve()}, {tmp_path.resolve()}, {(tmp_path / 'lib').resolve()}"
    assert f"(searched {dirs}, then the installed packages)" in err
    assert "put mytasks.py beside the config file or add its directory to " \
           "tasks.pythonpath" in err
    assert "not installed" not in err and "working directory must be" not in err


def test_a_missing_dependency_is_not_called_a_missing_module(tmp_path: Path) -> None:
    dep = _unique("notinstalled")
    (tmp_path / "mytasks.py").write_text(f"import {dep}\n\ndef resize() -> None: ...\n")
    cfg = toml_config(tmp_path, tasks={"resize": "mytasks:resize"})
    r = run_cli("--config", str(cfg), "serve")
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert (f"key tasks.resize: module 'mytasks' imports '{dep}', which is not installed: "
            f"pip install {dep}") in err
    assert "cannot import module" not in err and "searched" not in err


def test_a_known_dependency_names_its_package(tmp_path: Path, clean_imports: None) -> None:
    if importlib.util.find_spec("PIL") is not None:  # not a dependency of bulkrunner
        pytest.skip("PIL is installed here")
    name = _unique("images")
    (tmp_path / f"{name}.py").write_text("from PIL import Image\n\ndef resize() -> None: ...\n")
    cfg = load_config(toml_config(tmp_path, tasks={"resize": f"{name}:resize"}))
    with pytest.raises(ConfigError) as e:
        Registry.from_config(cfg)
    assert e.value.key == "tasks.resize"
    assert (f"module '{name}' imports 'PIL', which is not installed: pip install Pillow "
            "(it provides 'PIL') in the server's environment") in e.value.message


def test_a_package_without_the_module(tmp_path: Path, clean_imports: None) -> None:
    pkg = _unique("myapp")
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "reports.py").write_text(f"import {pkg}.helpers\n\n"
                                               "def build() -> None: ...\n")
    cfg = load_config(toml_config(tmp_path, tasks={"a": f"{pkg}.nope:build"}))
    with pytest.raises(ConfigError) as e:
        Registry.from_config(cfg)
    assert f"the package '{pkg}' (" in e.value.message
    assert "has no module 'nope'" in e.value.message
    cfg = load_config(toml_config(tmp_path, tasks={"b": f"{pkg}.reports:build"}))
    with pytest.raises(ConfigError) as e:
        Registry.from_config(cfg)
    assert (f"module '{pkg}.reports' imports '{pkg}.helpers', which does not exist in the "
            f"package '{pkg}'") in e.value.message
