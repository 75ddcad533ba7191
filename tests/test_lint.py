"""ruff and mypy are clean (they are in the dev extra, so CI runs them with the tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("cmd", [["ruff", "check", "bulkrunner", "tests", "bench"],
                                 [sys.executable, "-m", "mypy"]])
def test_clean(cmd: list[str]) -> None:
    if cmd[0] == "ruff" and shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    if cmd[0] == sys.executable:
        pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
