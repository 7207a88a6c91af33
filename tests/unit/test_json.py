"""pgstate's JSON decoding: orjson's speed without its float for integers beyond 64 bits."""

from __future__ import annotations

import json

import pytest

from pgstate._json import loads, loads_each

TEXTS = [
    '{"a": 1, "b": [true, null, 1.5, "x"]}',
    str(2**64 - 1),
    str(2**64),
    str(-(2**63) - 1),
    '{"n": 100000000000000000000000000000000000001}',
    '["1234567890123456789012345", 12]',  # a long digit run inside a string
    "1e400",  # beyond a double: orjson refuses, the standard library gives inf
    '"caf\\u00e9 \u2603"',
]


@pytest.mark.parametrize("text", TEXTS)
def test_same_values_as_the_standard_library(text: str) -> None:
    expected = json.loads(text)
    assert loads(text) == expected
    assert loads(text.encode()) == expected
    assert type(loads(text)) is type(expected)


def test_big_integers_stay_integers() -> None:
    value = loads(b'{"big": 18446744073709551616}')
    assert value == {"big": 2**64} and type(value["big"]) is int


def test_invalid_json_raises() -> None:
    with pytest.raises(ValueError):
        loads("{")
    with pytest.raises(ValueError):
        loads(b"{")


@pytest.mark.parametrize("text", TEXTS)
def test_a_page_decodes_as_each_text_alone(text: str) -> None:
    # One awkward text among ordinary ones sends the whole page down the careful path.
    page = ['{"i": 1}', text, '{"i": 12345678901234567}']
    decoded = loads_each(page)
    assert decoded == [json.loads(t) for t in page]
    assert [type(v) for v in decoded] == [type(json.loads(t)) for t in page]


def test_a_page_with_a_big_integer_keeps_it_exact() -> None:
    # 2**64 + 1 has no float that equals it: a rounded value would fail the comparison.
    page = ['{"a": 1}', '{"big": 18446744073709551617}']
    big = loads_each(page)[1]["big"]
    assert big == 2**64 + 1 and type(big) is int


def test_an_empty_page_decodes_to_nothing() -> None:
    assert loads_each([]) == []
