"""States and the param schema."""

from __future__ import annotations

import pytest

from bulkrunner.models import ParamSpec, State, derive_state, iso


def counts(**kw: int) -> dict[str, int]:
    return {s: kw.get(s, 0) for s in ("queued", "running", "succeeded", "failed", "cancelled")}


@pytest.mark.parametrize("c, state", [
    (counts(queued=3), State.QUEUED),
    (counts(queued=2, running=1), State.RUNNING),
    (counts(queued=2, succeeded=1), State.RUNNING),
    (counts(succeeded=3), State.SUCCEEDED),
    (counts(succeeded=2, failed=1), State.FAILED),
    (counts(succeeded=1, failed=1, cancelled=1), State.CANCELLED),
])
def test_job_state_follows_item_counts(c: dict[str, int], state: State) -> None:
    assert derive_state(c) is state


def test_iso_is_utc_with_millis() -> None:
    assert iso(0.5) == "1970-01-01T00:00:00.500Z"
    assert iso(None) is None


@pytest.mark.parametrize("spec, text, value", [
    (ParamSpec("n", "int"), "5", 5),
    (ParamSpec("x", "float"), "2.5", 2.5),
    (ParamSpec("b", "bool"), "yes", True),
    (ParamSpec("b", "bool"), "0", False),
    (ParamSpec("s", "str"), "5", "5"),
    (ParamSpec("l", "list", item_type="int"), "[1, 2]", [1, 2]),
    (ParamSpec("d", "dict"), '{"a": 1}', {"a": 1}),
    (ParamSpec("a", "any"), "7", 7),
    (ParamSpec("a", "any"), "hello", "hello"),
    (ParamSpec("m", "str", choices=("fast", "slow")), "slow", "slow"),
    (ParamSpec("n", "int", nullable=True), "null", None),
])
def test_from_text_coerces_by_type(spec: ParamSpec, text: str, value: object) -> None:
    assert spec.from_text(text) == value


@pytest.mark.parametrize("spec, text, words", [
    (ParamSpec("n", "int"), "five", "must be an integer"),
    (ParamSpec("x", "float"), "nan", "finite"),
    (ParamSpec("b", "bool"), "maybe", "true or false"),
    (ParamSpec("m", "str", choices=("fast", "slow")), "medium", "one of fast, slow"),
    (ParamSpec("l", "list"), "{", "JSON array"),
])
def test_from_text_says_what_was_expected(spec: ParamSpec, text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        spec.from_text(text)


@pytest.mark.parametrize("spec, value, problem", [
    (ParamSpec("n", "int"), 5, None),
    (ParamSpec("n", "int"), True, "must be an integer, not a boolean"),
    (ParamSpec("n", "int"), "5", "must be an integer, not a string"),
    (ParamSpec("x", "float"), 5, None),
    (ParamSpec("n", "int"), None, "must be int, not null"),
    (ParamSpec("n", "int", nullable=True), None, None),
    (ParamSpec("l", "list", item_type="int"), [1, "a"], "[1] must be an integer, not a string"),
    (ParamSpec("m", "str", choices=("a",)), "b", 'must be one of "a"'),
])
def test_check_json_values(spec: ParamSpec, value: object, problem: str | None) -> None:
    assert spec.check(value) == problem


def test_param_spec_round_trips_through_dict() -> None:
    spec = ParamSpec("m", "str", required=False, default="a", choices=("a", "b"),
                     nullable=True)
    assert ParamSpec.from_dict(spec.to_dict()) == spec
