"""json_object with msgspec first answers exactly as the standard library alone did: the same
values (types, -0.0, key order, duplicate keys, integers past 64 bits), and for what it
refuses the same reason and message, over tricky inputs and generated ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_decode import HOSTILE, REJECTED
from worker import jsonvalue
from worker.events import Reason
from worker.jsonvalue import Rejected, json_object

Outcome = tuple[Any, ...]


def tagged(value: Any) -> list[tuple[Any, ...]]:
    """``value`` with every type spelled out (``==`` takes 1 == 1.0 == True and 0.0 == -0.0,
    and ignores the order of a dict's keys, which the stored metadata keeps): its nodes in
    order, each with its keys or length. A loop, not recursion, for values nested ~1,000 deep."""
    out: list[tuple[Any, ...]] = []
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            out.append(("dict", tuple(node)))
            todo.extend(reversed(node.values()))
        elif isinstance(node, list):
            out.append(("list", len(node)))
            todo.extend(reversed(node))
        elif isinstance(node, float):
            out.append(("float", node.hex()))
        else:
            out.append((type(node).__name__, node))
    return out


def outcome(value: bytes) -> Outcome:
    try:
        return ("ok", tagged(json_object(value, "the value")))
    except Rejected as exc:
        return ("rejected", exc.reason, exc.message)


@contextmanager
def stdlib_only() -> Iterator[None]:
    """The parser as it was before msgspec: the standard library for every value."""
    saved = jsonvalue._FAST_MAX_DEPTH
    jsonvalue._FAST_MAX_DEPTH = -1
    try:
        yield
    finally:
        jsonvalue._FAST_MAX_DEPTH = saved


def assert_same_as_stdlib(value: bytes) -> Outcome:
    got = outcome(value)
    with stdlib_only():
        expected = outcome(value)
    assert got == expected, value[:200]
    return got


def nested(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


TRICKY = [
    # numbers
    b'{"n": -0}',
    b'{"n": -0.0}',
    b'{"n": 0e0}',
    b'{"n": -0e-0}',
    b'{"n": 1E2}',
    b'{"n": 1.5E+3}',
    b'{"n": 1e-400}',
    b'{"n": 5e-324}',
    b'{"n": 2.4703282292062327e-324}',  # just under half the smallest subnormal: 0.0
    b'{"n": 2.4703282292062328e-324}',  # just over: 5e-324
    b'{"n": 2.2250738585072011e-308}',
    b'{"n": 1.7976931348623157e308}',
    b'{"n": 1.7976931348623159e308}',  # rounds past the largest double: refused
    b'{"n": 0.1000000000000000055511151231257827021181583404541015625}',
    b'{"n": 1.' + b"1" * 800 + b"}",
    b'{"n": 0.' + b"0" * 5000 + b"1}",
    b'{"n": 1' + b"0" * 5000 + b".0}",
    b'{"n": 1e-99999999999}',
    b'{"n": 0e99999}',
    b'{"n": 1e99999999999999999999}',
    b'{"n": 9223372036854775807, "m": -9223372036854775808}',
    b'{"n": 9223372036854775808, "m": -9223372036854775809}',
    b'{"n": 18446744073709551616}',
    b'{"n": ' + b"9" * 4300 + b"}",  # the standard library's longest integer
    b'{"n": -' + b"9" * 4301 + b"}",
    b'{"n": NaN}',
    b'{"n": -Infinity}',
    b'{"n": 1e400}',
    b'{"n": 01}',
    b'{"n": 1.}',
    b'{"n": .1}',
    b'{"n": +1}',
    b'{"n": 1e}',
    b'{"n": true, "f": false, "z": null}',
    # strings
    b'{"s": "\\ud83d\\ude00 \\uD800\\uDC00 \\uDBFF\\uDFFF"}',
    b'{"s": "\\ud800"}',
    b'{"s": "\\udc00\\ud800"}',
    b'{"s": "\\ud800x"}',
    b'{"s": "\\ud800\\u0041"}',
    b'{"\\udfff": 1}',
    b'{"s": "\\u0000"}',
    b'{"\\u0000": 1}',
    b'{"s": "\\/ \\b \\f \\n \\r \\t \\" \\\\ \\u00e9 \\u20AC"}',
    b'{"s": "a\tb"}',
    b'{"s": "\x1f"}',
    b'{"s": "a\x7fb \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"}',
    b'{"s": "\\x"}',
    b'{"s": "\\u12"}',
    b'{"s": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8
    b'{"s": "\xc0\x80"}',  # an overlong NUL
    b'{"s": "\xf4\x90\x80\x80"}',  # past U+10FFFF
    b'\xef\xbb\xbf{"s": 1}',
    # structure
    b'{"a": 1, "b": 2, "a": 3}',
    b'{"a": {"x": 1}, "b": [], "a": [2], "a": {"y": 2}}',
    b'{"a": 1,}',
    b"[1,]",
    b'{"a" 1}',
    b"{1: 2}",
    b"{'a': 1}",
    b'{"a": 1} {"b": 2}',
    b"{}\x00",
    b" \r\n\t{} \r\n\t",
    b"\x0b{}",
    b"\xc2\xa0{}",
    b"",
    b"{}",
    b"[]",
    b'"s"',
    b"1",
    b"null",
    # nesting around the fast path's bound and around the recursion limit
    b'{"a": ' + b"[" * 255 + b"]" * 255 + b"}",
    b'{"a": ' + b"[" * 256 + b"]" * 256 + b"}",
    b'{"a": "' + b"[" * 300 + b'"}',
    *(nested(d) for d in (500, 900, 950, 980, 990, 995, 1000, 1010, 5000)),
]


@pytest.mark.parametrize("value", TRICKY)
def test_tricky_input_decodes_as_with_the_standard_library_alone(value: bytes) -> None:
    assert_same_as_stdlib(value)


def test_nesting_at_the_recursion_limit_is_refused_as_before() -> None:
    """Where the standard library stops depends on the stack's depth; msgspec alone would
    read a few levels more (json.loads' own frames count against the limit)."""
    with stdlib_only():
        deepest = next(d for d in range(1, 5000) if outcome(nested(d))[0] == "rejected")
    for depth in range(deepest - 10, deepest + 10):
        assert_same_as_stdlib(nested(depth))


@pytest.mark.parametrize(
    "value",
    [p.values[0] for p in HOSTILE]
    + [p.values[0].value for p in REJECTED if p.values[0].value is not None],
)
def test_decode_tests_inputs_decode_as_with_the_standard_library_alone(value: bytes) -> None:
    assert_same_as_stdlib(value)


@pytest.mark.parametrize(
    ("value", "reason", "message"),
    [
        (b'{"n": NaN}', Reason.INVALID_JSON, "the value is not JSON: NaN is not JSON"),
        (
            b'{"n": 1e400}',
            Reason.INVALID_JSON,
            "the value is not JSON: 1e400 is out of range for a JSON number",
        ),
        (b'{"s": "a\\u0000"}', Reason.NUL_BYTE, "s contains a NUL character (U+0000)"),
        (b'{"s": "\\ud800"}', Reason.INVALID_UTF8, "s contains an unpaired surrogate escape"),
        (
            nested(5000),
            Reason.INVALID_JSON,
            "the value is not JSON: maximum recursion depth exceeded while decoding a JSON array "
            "from a unicode string",
        ),
        (b'{"s": "\xed\xa0\x80"}', Reason.INVALID_UTF8, "the value is not valid UTF-8 (byte 7)"),
    ],
)
def test_each_decode_reason_and_message(value: bytes, reason: Reason, message: str) -> None:
    assert assert_same_as_stdlib(value) == ("rejected", reason, message)


def test_an_event_is_parsed_by_msgspec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is taken: with the standard library's parser gone, an event still reads."""

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the standard library parsed the event")

    monkeypatch.setattr(json, "loads", gone)
    event = b'{"id": "a", "text": "caf\\u00e9 [1]", "metadata": {"n": 18446744073709551616}}'
    assert json_object(event, "the value") == {
        "id": "a",
        "text": "café [1]",
        "metadata": {"n": 18446744073709551616},
    }


# --- generated ---------------------------------------------------------------------------------

# Every code point, lone surrogates included (written as \u escapes, or as invalid UTF-8 bytes).
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
numbers = st.from_regex(
    r"\A-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,4})?\Z", fullmatch=True
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
whitespace = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


@st.composite
def documents(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text, written by hand so that objects can repeat keys and numbers take any form."""
    kind = draw(
        st.sampled_from(["scalar", "number", "list", "object"] if depth < 4 else ["scalar"])
    )
    ws = draw(whitespace)
    if kind == "scalar":
        return json.dumps(draw(scalars), ensure_ascii=draw(st.booleans()))
    if kind == "number":
        return draw(numbers)
    items = draw(st.lists(documents(depth + 1), max_size=4))
    if kind == "list":
        return "[" + ws + ("," + ws).join(items) + "]"
    keys = draw(st.lists(st.sampled_from(["a", "b", "é", "\\u0041"]) | any_text, min_size=4))
    pairs = [json.dumps(k) + ws + ":" + v for k, v in zip(keys, items, strict=False)]
    return "{" + ws + ("," + ws).join(pairs) + ws + "}"


@st.composite
def objects(draw: st.DrawFn) -> bytes:
    text = draw(documents()) if draw(st.integers(0, 4)) == 0 else '{"v": ' + draw(documents()) + "}"
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated value with a few bytes inserted, replaced or removed."""
    value = bytearray(draw(objects()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(value)))
        byte = draw(st.sampled_from(b'"\\[]{},:0-.eE u\x00\x1f\x7f\xff\xed\xc3\t'))
        action = draw(st.sampled_from(["insert", "replace", "remove"]))
        if action == "insert" or at == len(value):
            value.insert(at, byte)
        elif action == "replace":
            value[at] = byte
        else:
            del value[at]
    return bytes(value)


@settings(max_examples=300, deadline=None)
@given(value=objects())
def test_generated_json_decodes_as_with_the_standard_library_alone(value: bytes) -> None:
    assert_same_as_stdlib(value)


@settings(max_examples=300, deadline=None)
@given(value=mutated() | st.binary(max_size=60))
def test_damaged_json_decodes_as_with_the_standard_library_alone(value: bytes) -> None:
    assert_same_as_stdlib(value)


@settings(max_examples=300, deadline=None)
@given(number=numbers)
def test_numbers_decode_as_with_the_standard_library_alone(number: str) -> None:
    assert_same_as_stdlib(b'{"n": ' + number.encode() + b"}")
