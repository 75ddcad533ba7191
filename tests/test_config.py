"""Config loading: defaults, the example file, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from bulkrunner.config import Config, config_from_dict, load_config
from bulkrunner.errors import ConfigError
from bulkrunner.server.tasks import Registry
from tests.conftest import ROOT


def _load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


def test_defaults_alone_serve_the_demo_tasks(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BULKRUNNER_CONFIG", raising=False)
    monkeypatch.delenv("BULKRUNNER_TOKEN", raising=False)
    cfg = load_config()
    assert cfg.source is None
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8470
    assert cfg.executor.type == "thread" and cfg.executor.max_workers == 4
    reg = Registry.from_config(cfg)
    assert {"echo", "sleep", "fail"} <= {t.name for t in reg}
    assert reg.default == "echo"


def test_example_config_loads_and_lists_every_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    cfg = load_config(ROOT / "config.example.toml")
    assert cfg == load_config(ROOT / "config.example.toml")
    for section in ("server", "executor", "store", "jobs", "notify"):
        for field in getattr(cfg, section).__dataclass_fields__:
            shown = (f"{field} =" in text or f"# {field} =" in text
                     or f"[[{section}.{field}]]" in text)
            assert shown, f"{section}.{field} missing"


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[store]\npath = "data/x.db"\n')
    assert cfg.store.path == str(tmp_path.resolve() / "data" / "x.db")


@pytest.mark.parametrize("text, key, words", [
    ("[server\nport = 1", None, "not valid TOML"),
    ("[server]\nprot = 1\n", "server.prot", "did you mean 'port'"),
    ("[server]\nport = \"80\"\n", "server.port", "whole number"),
    ("[server]\nport = 70000\n", "server.port", "between 0 and 65535"),
    ("[executor]\ntype = \"gpu\"\n", "executor.type", "thread, process, dask"),
    ("[executor]\nmax_workers = 0\n", "executor.max_workers", "at least 1"),
    ("[jobs]\ntimeout = -1\n", "jobs.timeout", "0 (none)"),
    ("[wat]\n", "wat", "unknown section"),
    ("[server]\nallowed_hosts = \"a.example\"\n", "server.allowed_hosts", "list of names"),
    ("[tasks]\nx = \"nocolon\"\n", "tasks.x", "module:function"),
    ("[tasks.x]\ntimeout = 3\n", "tasks.x.path", "path"),
    ("[tasks.x]\npath = \"a:b\"\ncolour = 1\n", "tasks.x.colour", "unknown key"),
])
def test_each_mistake_names_file_key_and_fix(tmp_path: Path, text: str, key: str | None,
                                             words: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert "c.toml" in e.value.message
    if key:
        assert e.value.key == key and key in e.value.message
    assert words in e.value.message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("target, words", [
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("tests.sample_tasks:nope", "has no function 'nope'"),
])
def test_task_that_cannot_be_imported_is_a_config_error(target: str, words: str) -> None:
    cfg = config_from_dict({"tasks": {"t": target}}, source="x.toml")
    with pytest.raises(ConfigError) as e:
        Registry.from_config(cfg)
    assert e.value.key == "tasks.t" and words in e.value.message


def test_default_task_must_exist() -> None:
    cfg = config_from_dict({"tasks": {"default": "nope"}}, source="x.toml")
    with pytest.raises(ConfigError, match="not a task"):
        Registry.from_config(cfg)


def test_token_from_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKRUNNER_TOKEN", "from-env")
    cfg = _load(tmp_path, '[server]\ntoken = "from-file"\n')
    assert cfg.server.token == "from-env"


def test_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BULKRUNNER_TOKEN", raising=False)
    (tmp_path / "tok").write_text("s3cret\n")
    cfg = _load(tmp_path, '[server]\ntoken_file = "tok"\n')
    assert cfg.server.token == "s3cret"


def test_overrides_are_validated() -> None:
    cfg = Config()
    assert cfg.with_overrides(executor={"max_workers": 9}).executor.max_workers == 9
    with pytest.raises(ConfigError, match=r"executor\.type"):
        cfg.with_overrides(executor={"type": "nope"})
