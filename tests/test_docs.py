"""The docs tell the truth: every CLI command is in the README, every key in the example."""

from __future__ import annotations

from bulkrunner.client.cli import cli
from tests.conftest import ROOT


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in cli.commands:  # type: ignore[attr-defined]
        assert f"  {name} " in readme or f"bulkrunner {name}" in readme, name


def test_every_command_has_help() -> None:
    for name, cmd in cli.commands.items():  # type: ignore[attr-defined]
        assert cmd.help, f"{name} has no docstring"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "pip install -e '.[dev]' && pytest"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()
