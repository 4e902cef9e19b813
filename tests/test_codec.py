"""The hot-path JSON helpers write and read exactly what the standard library does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iii_embedded._codec import dumps_lenient, dumps_strict, loads

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_dumps_writes_what_json_dumps_writes_and_loads_reads_it_back(value: Any) -> None:
    text = dumps_strict(value)
    assert text == json.dumps(value, allow_nan=False)
    assert dumps_lenient(value) == text
    assert loads(text) == json.loads(text)


def test_non_string_keys_are_written_as_json_dumps_writes_them() -> None:
    value = {1: "a", 2.5: "b", False: "c", None: "d"}
    assert dumps_strict(value) == json.dumps(value)
    assert dumps_strict(value) == '{"1": "a", "2.5": "b", "false": "c", "null": "d"}'


def test_strict_refuses_nan_and_lenient_writes_it() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        dumps_strict({"x": float("nan")})
    assert dumps_lenient([float("nan"), float("inf")]) == "[NaN, Infinity]"


def test_an_unsupported_type_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        dumps_strict({"x": {1, 2}})


def test_a_circular_structure_is_a_value_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps_strict(loop)


def test_loads_accepts_surrounding_whitespace_and_reports_bad_text_as_json_does() -> None:
    assert loads('  {"a": [1, 2]}\n') == {"a": [1, 2]}
    with pytest.raises(json.JSONDecodeError, match="Expecting ',' delimiter") as caught:
        loads("[1 2]")
    assert caught.value.pos == 3
    with pytest.raises(json.JSONDecodeError, match="Extra data"):
        loads("[1] [2]")
    with pytest.raises(json.JSONDecodeError, match="Expecting value"):
        loads("")
