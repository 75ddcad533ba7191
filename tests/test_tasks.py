"""The registry: signatures to param schemas, and submission checks."""

from __future__ import annotations

import pytest

from bulkrunner.config import config_from_dict
from bulkrunner.errors import InvalidSubmission
from bulkrunner.runtime import Context
from bulkrunner.server.tasks import Registry, task_from_function
from tests import sample_tasks


def test_schema_from_signature_and_hints() -> None:
    t = task_from_function("typed", "tests.sample_tasks:typed", sample_tasks.typed)
    specs = {p.name: p.to_dict() for p in t.params}
    assert specs["n"] == {"name": "n", "type": "int", "required": True, "default": None}
    assert specs["ratio"]["type"] == "float"
    assert specs["flag"]["type"] == "bool"
    assert specs["name"] == {"name": "name", "type": "str", "required": False, "default": "x"}
    assert specs["mode"]["choices"] == ["fast", "slow"]
    assert specs["color"]["choices"] == ["red", "green"] and specs["color"]["default"] == "red"
    assert specs["tags"]["type"] == "list" and specs["tags"]["nullable"] is True
    assert t.doc == "Echo typed params back."


def test_context_param_is_injected_not_a_param() -> None:
    t = task_from_function("slow", "tests.sample_tasks:slow", sample_tasks.slow)
    assert t.context_param == "ctx"
    assert [p.name for p in t.params] == ["seconds"]


def test_unannotated_param_takes_the_type_of_its_default() -> None:
    def f(n=3, label="x", anything=None):  # type: ignore[no-untyped-def]
        return n

    t = task_from_function("f", "m:f", f)
    assert [p.type for p in t.params] == ["int", "str", "any"]


def test_positional_only_params_are_refused() -> None:
    def f(a: int, /) -> int:
        return a

    with pytest.raises(TypeError, match="positional-only"):
        task_from_function("f", "m:f", f)


def test_check_names_each_field() -> None:
    t = task_from_function("add", "tests.sample_tasks:add", sample_tasks.add)
    assert t.check({"a": 1}) == {}
    problems = t.check({"a": "x", "c": 1})
    assert problems["params.a"] == "must be an integer, not a string"
    assert problems["params.c"].startswith("unknown param; add takes a, b")
    assert t.check({}) == {"params.a": "required param is missing"}
    assert t.check({}, complete=False) == {}


def test_var_keyword_accepts_any_param() -> None:
    def f(**kw: object) -> None:
        return None

    assert task_from_function("f", "m:f", f).check({"whatever": 1}) == {}


def test_registry_lookup_and_default() -> None:
    reg = Registry.from_config(config_from_dict({"tasks": {"add": "tests.sample_tasks:add"}}))
    assert reg.get(None).name == "echo"
    assert reg.get("add").target == "tests.sample_tasks:add"
    with pytest.raises(InvalidSubmission) as e:
        reg.get("os:system")
    assert "unknown task 'os:system'" in e.value.fields["task"]
    assert "tests.sample_tasks" in reg.modules()


def test_builtins_can_be_switched_off() -> None:
    reg = Registry.from_config(config_from_dict(
        {"tasks": {"builtins": False, "default": "add", "add": "tests.sample_tasks:add"}}))
    assert [t.name for t in reg] == ["add"]


def test_context_class_is_the_public_one() -> None:
    import bulkrunner

    assert bulkrunner.Context is Context
