"""The four import rules of the package's rooms, third-party libraries kept at their edges,
the client side and the worker side loading nothing heavy, and no module past a few
hundred lines.

- ``client/`` imports no server code (``server``, ``store``, ``executors``, ``runtime``) and
  none of Flask, waitress, Dask or sqlite3;
- ``runtime/`` imports only the standard library and ``errors`` / ``models``;
- ``store/`` knows nothing of execution policy: only ``errors`` / ``models`` and sqlite3;
- ``server/`` may use everything.

The shared modules at the top (``errors``, ``models``, ``config``) import no room, and
``executors/`` runs the runtime and nothing of the server.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "bulkrunner"

SHARED = {"errors", "models", "config"}
#: What each room (or top-level module) may import from the package.
ALLOWED: dict[str, set[str]] = {
    "errors": set(), "models": {"errors"}, "config": {"errors", "models"},
    "runtime": {"errors", "models", "runtime"},
    "store": {"errors", "models", "store"},
    "executors": SHARED | {"runtime", "executors"},
    "client": SHARED | {"client"},
    "server": SHARED | {"runtime", "executors", "store", "server", "builtin", "__init__"},
    "builtin": {"runtime"},
    "flask": SHARED | {"server"},
    "__init__": {"runtime"},
    "__main__": {"client"},
}
#: Third-party (and sqlite3) imports, and the rooms allowed to make them.
EDGES: dict[str, set[str]] = {
    "flask": {"server", "flask"}, "werkzeug": {"server", "flask"}, "jinja2": {"server"},
    "waitress": {"server"}, "prometheus_client": {"server"}, "click": {"client", "server"},
    "sqlite3": {"store"}, "distributed": {"executors"}, "dask": {"executors"},
    "urllib3": {"server"}, "cron_descriptor": {"server"}, "croniter": {"config", "server"},
}
STDLIB = sys.stdlib_module_names


def _room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "bulkrunner":
                out.add(node.module)
            else:  # ``from bulkrunner import errors``: each name is a module (or __version__)
                out |= {"bulkrunner." + (a.name if not a.name.startswith("_") else "__init__")
                        for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.add("<relative>")
    return out


def test_every_module_keeps_its_rooms_rules() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        room = _room(path)
        assert room in ALLOWED, f"{path}: a new room or top-level module; give it rules here"
        for name in sorted(_imports(path)):
            parts = name.split(".")
            if name == "<relative>":
                problems.append(f"{path.relative_to(PKG)}: relative import (use absolute)")
            elif parts[0] == "bulkrunner":
                target = parts[1] if len(parts) > 1 else "__init__"
                if target != room and target not in ALLOWED[room]:
                    problems.append(f"{path.relative_to(PKG)} imports bulkrunner.{target}")
            elif parts[0] in EDGES:
                if room not in EDGES[parts[0]]:
                    problems.append(f"{path.relative_to(PKG)} imports {parts[0]} "
                                    f"(allowed in {sorted(EDGES[parts[0]])})")
            elif room == "runtime" and parts[0] not in STDLIB:
                problems.append(f"{path.relative_to(PKG)} imports {parts[0]} (runtime is "
                                "standard library only)")
    assert not problems, "\n".join(problems)


#: Lines a module may have. Modules are split by concept, a few hundred lines each; one
#: that grows past this holds two things, and the second gets a module of its own.
MAX_LINES = 450


def test_no_module_is_over_a_few_hundred_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in sorted(PKG.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines, split by what each part owns: {long}"


def test_the_rules_catch_a_wrong_import(tmp_path: Path) -> None:
    # The checker itself: a client module importing the store is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("from bulkrunner.store import Store\nimport flask\n")
    names = _imports(bad)
    assert "bulkrunner.store" in names and "flask" in names
    assert "store" not in ALLOWED["client"] and "client" not in EDGES["flask"]


def _loaded(code: str, modules: tuple[str, ...]) -> str:
    probe = (f"import sys; {code}; "
             f"print(','.join(m for m in {modules!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_client_side_loads_no_server_code() -> None:
    heavy = _loaded("import bulkrunner.client.cli, bulkrunner.client",
                    ("flask", "werkzeug", "waitress", "distributed", "dask", "sqlite3",
                     "bulkrunner.server", "bulkrunner.store", "bulkrunner.executors"))
    assert heavy == "", f"client side imported: {heavy}"


def test_worker_side_is_light() -> None:
    # Worker processes and Dask workers import it: no server code, no third party.
    heavy = _loaded("import bulkrunner.runtime, bulkrunner.builtin",
                    ("flask", "click", "sqlite3", "bulkrunner.store", "bulkrunner.server"))
    assert heavy == "", f"worker side imported: {heavy}"
