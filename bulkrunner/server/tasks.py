"""The task registry: names from the config resolved to functions, and their param schema.

Tasks are resolved once, at start-up, from ``"module:function"`` strings in ``[tasks]``; a
failure is a :class:`ConfigError`. Clients only ever pick a *name* from this registry, so no
client input reaches an import.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bulkrunner.config import Config
from bulkrunner.errors import ConfigError, InvalidSubmission, NotFound
from bulkrunner.models import ParamSpec
from bulkrunner.runtime import Context, resolve

BUILTIN_TASKS = {
    "echo": "bulkrunner.builtin:echo",
    "sleep": "bulkrunner.builtin:sleep",
    "fail": "bulkrunner.builtin:fail",
}


@dataclass(frozen=True)
class Task:
    """A registered task: its name, its function and what it accepts."""

    name: str
    target: str
    fn: Callable[..., Any]
    params: tuple[ParamSpec, ...]
    doc: str
    context_param: str | None = None
    accepts_any: bool = False          # the function takes **kwargs
    timeout: float | None = None
    max_attempts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The task as the API shows it: name, doc and params."""
        return {"name": self.name, "doc": self.doc,
                "params": [p.to_dict() for p in self.params]}

    @functools.cached_property
    def by_name(self) -> dict[str, ParamSpec]:
        """The params by name (computed once: bulk submissions check every item)."""
        return {p.name: p for p in self.params}

    def check(self, params: Mapping[str, Any], *, prefix: str = "params",
              complete: bool = True, given: Collection[str] = (),
              sep: str = ".") -> dict[str, str]:
        """Field -> problem for ``params``; empty when they fit the signature. Fields are
        named ``prefix``, ``sep`` and the param's name (``params.n``, ``items[3].n``).

        With ``complete=False`` missing required params are not reported (the job-level
        params of a bulk, which items complete); names in ``given`` count as present (an
        item's check, with the job's params given).
        """
        problems: dict[str, str] = {}
        known = self.by_name
        for name, value in params.items():
            spec = known.get(name)
            if spec is None:
                if not self.accepts_any:
                    problems[f"{prefix}{sep}{name}"] = (
                        f"unknown param; {self.name} takes "
                        f"{', '.join(known) or 'no params'}")
                continue
            problem = spec.check(value)
            if problem:
                problems[f"{prefix}{sep}{name}"] = problem
        if complete:
            for spec in self.params:
                if spec.required and spec.name not in params and spec.name not in given:
                    problems[f"{prefix}{sep}{spec.name}"] = "required param is missing"
        return problems


class Registry:
    """Name -> :class:`Task`, built from the config (plus the built-in demo tasks)."""

    def __init__(self, tasks: Iterable[Task], default: str | None = None) -> None:
        self._tasks = {t.name: t for t in tasks}
        self.default = default if default in self._tasks else None

    @classmethod
    def from_config(cls, cfg: Config) -> Registry:
        """Import every configured task. Raises ConfigError for one that cannot be used."""
        entries: dict[str, tuple[str, float | None, int | None, str | None]] = {}
        if cfg.builtins:
            for name, target in BUILTIN_TASKS.items():
                entries[name] = (target, None, None, None)
        for t in cfg.tasks:
            entries[t.name] = (t.path, t.timeout, t.max_attempts, t.doc)
        dirs = add_import_dirs(cfg)
        tasks = []
        for name, (target, timeout, attempts, doc) in entries.items():
            key = f"tasks.{name}"
            try:
                fn = resolve(target)
            except ModuleNotFoundError as e:
                raise ConfigError(_missing_module(target, e, dirs), file=cfg.source,
                                  key=key) from None
            except AttributeError:
                raise ConfigError(f"{target!r}: the module has no function "
                                  f"{target.partition(':')[2]!r}; fix the name after the ':'",
                                  file=cfg.source, key=key) from None
            except Exception as e:
                raise ConfigError(f"importing {target!r} failed with "
                                  f"{type(e).__name__}: {e}", file=cfg.source, key=key) from None
            try:
                tasks.append(task_from_function(name, target, fn, timeout=timeout,
                                                max_attempts=attempts, doc=doc))
            except TypeError as e:
                raise ConfigError(str(e), file=cfg.source, key=key) from None
        if cfg.default_task and cfg.default_task not in entries:
            raise ConfigError(f"names {cfg.default_task!r}, which is not a task; known tasks: "
                              f"{', '.join(sorted(entries)) or 'none'}",
                              file=cfg.source, key="tasks.default")
        return cls(tasks, cfg.default_task)

    def __iter__(self) -> typing.Iterator[Task]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def get(self, name: str | None) -> Task:
        """The task called ``name`` (the default task for None); 422 when unknown."""
        if name is None:
            if self.default is None:
                raise InvalidSubmission({"task": "required: name a task (no default task "
                                                 "is configured)"})
            name = self.default
        if not isinstance(name, str) or name not in self._tasks:
            shown = name if isinstance(name, str) else repr(name)
            raise InvalidSubmission(
                {"task": f"unknown task {shown[:100]!r}; known tasks: "
                         f"{', '.join(sorted(self._tasks))}"})
        return self._tasks[name]

    def lookup(self, name: str) -> Task:
        """The task called ``name``, named in a path: NotFound (404) when unknown."""
        task = self._tasks.get(name)
        if task is None:
            raise NotFound(f"no task called {name[:100]!r}; known tasks: "
                           f"{', '.join(sorted(self._tasks))}", {"task": name[:100]})
        return task

    def modules(self) -> list[str]:
        """Modules the tasks live in (preloaded by process workers)."""
        return sorted({t.target.partition(":")[0] for t in self._tasks.values()})


def add_import_dirs(cfg: Config) -> list[str]:
    """Put the config file's directory, the working directory and ``tasks.pythonpath`` at
    the front of ``sys.path``, in that order and once each; return them.

    Done before any task import, and before the process executor starts its forkserver
    (which, like a spawned child, is given this ``sys.path``)."""
    dirs = cfg.import_dirs()
    rest = [p for p in sys.path if p not in dirs]
    sys.path[:] = [*dirs, *rest]
    importlib.invalidate_caches()  # a directory made after start-up is seen too
    return dirs


#: Import names whose package on PyPI is called something else.
_DISTRIBUTIONS = {"PIL": "Pillow", "cv2": "opencv-python", "yaml": "PyYAML",
                  "sklearn": "scikit-learn", "bs4": "beautifulsoup4", "dateutil":
                  "python-dateutil", "magic": "python-magic", "docx": "python-docx"}


def _missing_module(target: str, e: ModuleNotFoundError, dirs: list[str]) -> str:
    """The message for a task whose module, or a module it imports, is not found."""
    module = target.partition(":")[0]
    missing = e.name or ""
    searched = f"searched {', '.join(dirs)}, then the installed packages"
    if "." in missing and (missing == module or module.startswith(missing + ".")):
        parent, _, last = missing.rpartition(".")
        found = getattr(sys.modules.get(parent), "__file__", None) or parent
        return (f"cannot import module {module!r}: the package {parent!r} ({found}) has no "
                f"module {last!r}; fix the module path before the ':'")
    if not missing or missing == module or module.startswith(missing + "."):
        # The module asked for (or the package it is in) is not on the path.
        top = module.split(".")[0]
        where = f"the package {top}/" if "." in module else f"{module}.py"
        return (f"cannot import module {module!r}: no module named {missing or module!r} "
                f"({searched}); put {where} beside the config file or add its directory to "
                "tasks.pythonpath, or install it")
    top = missing.split(".")[0]
    if top == module.split(".")[0]:
        return (f"module {module!r} imports {missing!r}, which does not exist in the "
                f"package {top!r}; fix that import")
    dist = _DISTRIBUTIONS.get(top)
    fix = (f"pip install {dist} (it provides {top!r})" if dist else
           f"pip install {top} (or the package that provides it)")
    return (f"module {module!r} imports {missing!r}, which is not installed: {fix} in the "
            "server's environment; if it is a module of your own, put its directory in "
            "tasks.pythonpath")


def task_from_function(name: str, target: str, fn: Callable[..., Any], *,
                       timeout: float | None = None, max_attempts: int | None = None,
                       doc: str | None = None) -> Task:
    """Derive a Task's param schema from ``fn``'s signature and type hints."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{target}: cannot read its signature ({e})") from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        hints = {k: p.annotation for k, p in sig.parameters.items()
                 if p.annotation is not inspect.Parameter.empty}
    params, ctx_param, accepts_any = [], None, False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            accepts_any = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"{target}: parameter {p.name!r} is positional-only; tasks are "
                            "called with keyword arguments")
        hint = hints.get(p.name, inspect.Parameter.empty)
        if hint is Context or Context in typing.get_args(hint):
            ctx_param = p.name
            continue
        has_default = p.default is not inspect.Parameter.empty
        default = _jsonable_default(p.default) if has_default else None
        if hint is inspect.Parameter.empty and has_default and p.default is not None:
            hint = type(p.default)
        params.append(ParamSpec(name=p.name, required=not has_default, default=default,
                                **_describe(hint)))
    return Task(name=name, target=target, fn=fn, params=tuple(params),
                doc=doc or inspect.getdoc(fn) or "", context_param=ctx_param,
                accepts_any=accepts_any, timeout=timeout, max_attempts=max_attempts)


_SIMPLE = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict",
           tuple: "list"}


def _describe(hint: Any) -> dict[str, Any]:
    """ParamSpec fields (type, choices, item_type, nullable) for a type hint."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return {"type": "any"}
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = tuple(m.value for m in hint)
        return {"type": _common_type(values), "choices": values}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return {"type": _common_type(args), "choices": tuple(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        nullable = len(rest) < len(args)
        if len(rest) == 1:
            return {**_describe(rest[0]), "nullable": nullable}
        if set(rest) == {int, float}:
            return {"type": "float", "nullable": nullable}
        return {"type": "any", "nullable": nullable}
    if origin in (list, tuple, set, frozenset) or origin in (typing.Sequence, typing.Iterable):
        inner = _describe(args[0])["type"] if args and args[0] is not Ellipsis else None
        return {"type": "list", "item_type": inner if inner != "any" else None}
    if origin in (dict, typing.Mapping) or origin is Mapping:
        return {"type": "dict"}
    if hint in (typing.Sequence, typing.Iterable):
        return {"type": "list"}
    return {"type": "any"}


def _common_type(values: tuple[Any, ...]) -> str:
    kinds = {_SIMPLE.get(type(v), "any") for v in values}
    return kinds.pop() if len(kinds) == 1 else "any"


def _jsonable_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        return value
    return repr(value)
