"""Input and value models: Position text form and order, NewEvent validation, ExpectedVersion."""

from __future__ import annotations

import math
import pickle
import time
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from pgstate import START, ExpectedVersion, NewEvent, Position
from pgstate.models import encode_json, uuid7

# --- Position --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tx", "pos"),
    [
        ("0:0", 0, 0),
        ("1:2", 1, 2),
        ("748:1000001", 748, 1_000_001),
        (f"{2**64 - 1}:{2**63 - 1}", 2**64 - 1, 2**63 - 1),
    ],
)
def test_position_parse_and_str_round_trip(text: str, tx: int, pos: int) -> None:
    position = Position.parse(text)
    assert position == Position(tx, pos)
    assert (position.tx, position.pos) == (tx, pos)
    assert str(position) == text
    assert Position.parse(str(position)) == position


def test_position_orders_by_tx_then_pos() -> None:
    texts = ["5:1", "2:9", "2:10", "10:0", "0:0", "5:0"]
    ordered = sorted(Position.parse(text) for text in texts)
    assert [str(p) for p in ordered] == ["0:0", "2:9", "2:10", "5:0", "5:1", "10:0"]
    # Numeric, not textual: "10:0" sorts after "9:99".
    assert Position.parse("9:99") < Position.parse("10:0")
    assert Position(3, 1) > Position(2, 1_000_000)
    assert min(ordered) == START
    assert Position(0, 0) == START


def test_position_is_frozen_and_hashable() -> None:
    position = Position(1, 2)
    with pytest.raises(AttributeError):
        position.tx = 3  # type: ignore[misc]
    assert {Position(1, 2), Position.parse("1:2")} == {position}


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        "1",
        "1:",
        ":2",
        "a:b",
        "1:b",
        "-1:2",
        "1:-2",
        "+1:2",
        " 1:2",
        "1:2 ",
        "1 :2",
        "1:2:3",
        "1.0:2",
        "0x1:2",
        "1;2",
        "１:２",  # fullwidth digits: str.isdigit() says yes, but this is no position
        "²:2",
        "١:٢",
        f"{2**64}:1",  # tx is an xid8: below 2**64
        f"1:{2**63}",  # pos is a bigint: below 2**63
        "1" * 40 + ":1",
    ],
)
def test_position_rejects_bad_strings(text: str) -> None:
    with pytest.raises(ValueError, match="tx:pos"):
        Position.parse(text)


# --- NewEvent --------------------------------------------------------------------------------


def test_new_event_defaults_and_encoding() -> None:
    event = NewEvent(type="Opened", data={"b": [1, 2.5, None, True], "a": "é"})
    assert isinstance(event.event_id, uuid.UUID)
    assert event.event_id != NewEvent(type="Opened").event_id
    assert (event.metadata, event.schema_version) == ({}, 1)
    assert (event.causation_id, event.correlation_id) == (None, None)
    assert event.data_json == '{"b":[1,2.5,null,true],"a":"é"}'
    assert event.metadata_json == "{}"


def test_new_event_copies_and_pickles_carry_their_own_encoding() -> None:
    event = NewEvent(type="A", data={"k": 1}, metadata={"m": "x"})
    changed = event.model_copy(update={"data": {"k": 2}})
    assert changed.data_json == '{"k":2}' and changed.metadata_json == '{"m":"x"}'
    assert changed.encoded_size == len('{"k":2}') + len('{"m":"x"}')
    restored = pickle.loads(pickle.dumps(event))
    assert restored == event and restored.data_json == '{"k":1}'
    assert event.model_copy().encoded == event.encoded


def test_new_event_is_frozen() -> None:
    event = NewEvent(type="Opened")
    with pytest.raises(ValidationError):
        event.type = "Closed"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["data", "metadata"])
def test_new_event_rejects_non_finite_floats(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match="not JSON"):
        NewEvent.model_validate({"type": "Measured", field: {"x": [1, {"y": value}]}})


@pytest.mark.parametrize(
    "value",
    [{1, 2}, object(), b"bytes", uuid.uuid4(), 1j, frozenset()],
    ids=["set", "object", "bytes", "uuid", "complex", "frozenset"],
)
@pytest.mark.parametrize("field", ["data", "metadata"])
def test_new_event_rejects_non_json_values(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match="not JSON"):
        NewEvent.model_validate({"type": "Opened", field: {"nested": {"value": value}}})


@pytest.mark.parametrize(
    "payload",
    [{"text": "a\x00b"}, {"a\x00": 1}, {"list": ["ok", ["\x00"]]}, {"mixed": "\\\x00"}],
    ids=["value", "key", "nested", "after-backslash"],
)
@pytest.mark.parametrize("field", ["data", "metadata"])
def test_new_event_rejects_nul_in_strings(field: str, payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="NUL"):
        NewEvent.model_validate({"type": "Opened", field: payload})


@pytest.mark.parametrize("text", ["\\u0000", "C:\\u0000dir", "\\\\u0000", "u0000", "\\\\\\\\u0000"])
def test_new_event_accepts_text_that_only_looks_like_a_nul_escape(text: str) -> None:
    # A literal backslash followed by "u0000" is ordinary text, not a NUL character.
    event = NewEvent(type="Opened", data={"path": text})
    assert event.data == {"path": text}
    assert "\x00" not in event.data["path"]


def test_new_event_rejects_lone_surrogates() -> None:
    with pytest.raises(ValidationError, match="surrogate"):
        NewEvent(type="Opened", data={"text": "\ud800"})
    with pytest.raises(ValidationError):
        NewEvent(type="\udfff")


@pytest.mark.parametrize(
    "bad_type",
    ["", "a\x00b", "\x00", "x" * 201],
    ids=["empty", "nul-inside", "only-nul", "201-chars"],
)
def test_new_event_rejects_bad_type(bad_type: str) -> None:
    with pytest.raises(ValidationError) as caught:
        NewEvent(type=bad_type)
    assert caught.value.errors()[0]["loc"] == ("type",)


def test_new_event_type_length_limit_is_200() -> None:
    assert NewEvent(type="x" * 200).type == "x" * 200
    assert NewEvent(type="é" * 200).type == "é" * 200


@pytest.mark.parametrize("bad", [None, 3, ["Opened"]], ids=["none", "int", "list"])
def test_new_event_type_must_be_a_string(bad: Any) -> None:
    with pytest.raises(ValidationError):
        NewEvent.model_validate({"type": bad})


def test_new_event_rejects_extra_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        NewEvent.model_validate({"type": "Opened", "stream_id": "order-1"})
    assert caught.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(ValidationError):
        NewEvent(type="Opened", version=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "fields",
    [
        {"data": [1, 2]},
        {"data": "text"},
        {"metadata": None},
        {"data": {1: "int key"}},
        {"schema_version": 0},
        {"schema_version": -1},
        {"event_id": "not-a-uuid"},
        {"causation_id": 42},
    ],
    ids=[
        "data-list",
        "data-str",
        "metadata-none",
        "int-key",
        "schema-0",
        "schema-neg",
        "event-id",
        "causation-id",
    ],
)
def test_new_event_rejects_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NewEvent.model_validate({"type": "Opened", **fields})


def test_new_event_same_id_round_trips_through_a_mapping() -> None:
    event_id = uuid.uuid4()
    event = NewEvent.model_validate(
        {"type": "Opened", "event_id": str(event_id), "schema_version": 3}
    )
    assert event.event_id == event_id and event.schema_version == 3


def test_encode_json_is_strict() -> None:
    assert encode_json({"a": [1, "ü"]}, "payload") == '{"a":[1,"ü"]}'
    with pytest.raises(ValueError, match="payload is not JSON"):
        encode_json({"a": math.nan}, "payload")
    with pytest.raises(ValueError, match="payload contains a NUL"):
        encode_json(["\x00"], "payload")


# --- ExpectedVersion -------------------------------------------------------------------------


def test_expected_version_values() -> None:
    assert {member.name: member.value for member in ExpectedVersion} == {
        "ANY": -1,
        "STREAM_EXISTS": -2,
        "NO_STREAM": 0,
    }
    assert isinstance(ExpectedVersion.NO_STREAM, int)
    assert int(ExpectedVersion.NO_STREAM) == 0
    assert int(ExpectedVersion.ANY) == -1
    assert ExpectedVersion(-2) is ExpectedVersion.STREAM_EXISTS
    with pytest.raises(ValueError):
        ExpectedVersion(5)


def test_default_event_ids_are_time_ordered_uuid7() -> None:
    before = time.time_ns() // 1_000_000
    first = NewEvent(type="A").event_id
    time.sleep(0.003)
    second = uuid7()
    after = time.time_ns() // 1_000_000
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert before <= first.int >> 80 <= after
    assert first < second  # a later millisecond sorts later
    assert len({uuid7() for _ in range(10_000)}) == 10_000
