"""Imports point one way (architecture.md), third-party libraries stay in their edge
modules, and the client side loads no Flask, waitress or Dask."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "bulkrunner"

# A module may import only modules of a lower layer. Lower layers know nothing of higher.
LAYERS: dict[str, int] = {
    "errors": 0, "models": 1, "display": 1, "capture": 1, "config": 2, "worker": 2,
    "client": 3, "__init__": 3, "procpool": 3, "dask_executor": 3, "executors": 4,
    "tasks": 4, "builtin": 4, "store": 4, "openapi": 4, "itemfiles": 5, "retention": 5,
    "dispatcher": 6, "service": 7, "web": 8, "metrics": 8, "app": 9, "server": 10,
    "cli": 11, "__main__": 12,
}
# Third-party (and sqlite3) imports allowed only in these modules.
EDGES = {"flask": {"app", "web"}, "werkzeug": {"app", "web"}, "jinja2": {"web"},
         "waitress": {"server"}, "click": {"cli"}, "sqlite3": {"store"},
         "distributed": {"dask_executor"}, "dask": {"dask_executor"},
         "prometheus_client": {"metrics"}}


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "bulkrunner":
                out |= {f"bulkrunner.{a.name}" for a in node.names}
    return out


def test_imports_point_one_way() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_of(path)
        assert me in LAYERS, f"{path}: new module; give it a layer in this test"
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "bulkrunner" and len(parts) > 1:
                target = parts[1]
                if target not in LAYERS or target == me:
                    continue
                if (me, target) == ("openapi", "__init__"):
                    continue
                if LAYERS[target] >= LAYERS[me]:
                    problems.append(f"{me} imports {target}")
            elif parts[0] == "bulkrunner" and me not in ("openapi",) and LAYERS[me] <= 3:
                problems.append(f"{me} imports the package")
            elif parts[0] in EDGES and me not in EDGES[parts[0]]:
                problems.append(f"{me} imports {parts[0]} (allowed in {EDGES[parts[0]]})")
    assert not problems, "\n".join(problems)


def test_client_side_loads_no_server_code() -> None:
    code = ("import sys, bulkrunner.cli, bulkrunner.client; "
            "heavy = [m for m in ('flask', 'werkzeug', 'waitress', 'distributed', 'dask', "
            "'sqlite3', 'bulkrunner.app', 'bulkrunner.store') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "", f"client side imported: {out.stdout.strip()}"


def test_worker_module_is_light() -> None:
    # Worker processes and Dask workers import it: no server code, no third party.
    code = ("import sys, bulkrunner.worker; "
            "print(','.join(m for m in ('flask', 'click', 'sqlite3', 'bulkrunner.store') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
