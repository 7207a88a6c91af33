"""Bad input is refused with InvalidInput (SQLSTATE SM012), or with pydantic's
ValidationError where a NewEvent being built refuses it, and nothing is stored. The SQL
functions refuse bad input on their own too, for callers that bypass Python."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError
from sqlalchemy import Connection, text

from pgstate import (
    ExpectedVersion,
    InvalidInput,
    NewEvent,
    Position,
    Settings,
    Store,
    StreamAppend,
    StreamCondition,
)
from pgstate.machine import Machine, State


def opened(n: int = 1) -> list[NewEvent]:
    return [NewEvent(type="Opened", data={"n": i}) for i in range(n)]


def counts(conn: Connection) -> tuple[int, int]:
    events = conn.execute(text("SELECT count(*) FROM pgstate.events")).scalar_one()
    streams = conn.execute(text("SELECT count(*) FROM pgstate.streams")).scalar_one()
    return int(events), int(streams)


@contextmanager
def stores_nothing(conn: Connection) -> Iterator[None]:
    before = counts(conn)
    yield
    assert counts(conn) == before


@contextmanager
def invalid(conn: Connection, field: str | None = None) -> Iterator[None]:
    """The block raises InvalidInput (about ``field``) and stores nothing."""
    with stores_nothing(conn), pytest.raises(InvalidInput) as caught:
        yield
    assert caught.value.sqlstate == "SM012"
    assert caught.value.retryable is False
    if field is not None:
        assert caught.value.detail.get("field") == field


BAD_STREAM_IDS: list[Any] = ["", "x" * 201, "a\x00b", "\x00", 123, None, b"order-1", "a-\ud800"]
BAD_STREAM_ID_NAMES = ["empty", "201-chars", "nul", "only-nul", "int", "none", "bytes", "surrogate"]


# --- stream ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_id", BAD_STREAM_IDS, ids=BAD_STREAM_ID_NAMES)
def test_bad_stream_id_on_append(store: Store, conn: Connection, stream_id: Any) -> None:
    with invalid(conn, "stream_id"):
        store.append(stream_id, opened(), conn=conn)


@pytest.mark.parametrize("stream_id", BAD_STREAM_IDS, ids=BAD_STREAM_ID_NAMES)
def test_bad_stream_id_on_reads_and_checks(store: Store, conn: Connection, stream_id: Any) -> None:
    with invalid(conn, "stream_id"):
        store.read_stream(stream_id, conn=conn)
    with invalid(conn, "stream_id"):
        store.stream_state(stream_id, conn=conn)
    with invalid(conn, "stream_id"):
        store.check_version(stream_id, ExpectedVersion.ANY, conn=conn)


@pytest.mark.parametrize("stream_id", BAD_STREAM_IDS, ids=BAD_STREAM_ID_NAMES)
def test_bad_stream_id_in_append_many(store: Store, conn: Connection, stream_id: Any) -> None:
    # The good stream before it is not written either: everything is checked first.
    with invalid(conn, "stream_id"):
        store.append_many(
            [StreamAppend("good-1", opened()), StreamAppend(stream_id, opened())], conn=conn
        )
    with invalid(conn, "stream_id"):
        store.append_many(
            [StreamAppend("good-1", opened())],
            conditions=[StreamCondition(stream_id, 0)],
            conn=conn,
        )
    assert store.stream_state("good-1", conn=conn) is None


def test_longest_stream_id_is_accepted(store: Store, conn: Connection) -> None:
    longest = "s" * 200
    assert store.append(longest, opened(), conn=conn).version == 1
    state = store.stream_state(longest, conn=conn)
    assert state is not None and state.stream_id == longest and state.category == longest


# --- event payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        {"type": "Opened", "data": {"tags": {"a", "b"}}},
        {"type": "Opened", "data": {"at": object()}},
        {"type": "Opened", "data": {"ratio": float("nan")}},
        {"type": "Opened", "metadata": {"x": float("inf")}},
        {"type": "Opened", "data": {"text": "a\x00b"}},
        {"type": "Opened", "data": {"text": "\udc80"}},
        {"type": "", "data": {}},
        {"type": "x" * 201},
        {"type": "Op\x00ened"},
        {"type": "Opened", "stream_id": "order-1"},
        {"data": {"no": "type"}},
        {"type": "Opened", "schema_version": 2**31},
        {"type": "Op\ud800ened"},
        {"type": "Opened", "data": {"big": [1.152921504606847e18]}},
        {"type": "Opened", "metadata": {"big": -1e16}},
    ],
    ids=[
        "set",
        "object",
        "nan",
        "inf-metadata",
        "nul-in-data",
        "surrogate",
        "empty-type",
        "long-type",
        "nul-in-type",
        "extra-field",
        "missing-type",
        "schema-version-over-int4",
        "surrogate-in-type",
        "float-read-back-as-int",
        "float-read-back-as-int-metadata",
    ],
)
def test_event_mapping_rejected_by_the_model(
    store: Store, conn: Connection, mapping: dict[str, Any]
) -> None:
    with invalid(conn, "events"):
        store.append("order-1", [{"type": "Fine"}, mapping], conn=conn)  # type: ignore[list-item]
    assert store.stream_state("order-1", conn=conn) is None
    with pytest.raises(ValidationError):
        NewEvent(**mapping)


def test_event_data_nested_too_deeply(store: Store, conn: Connection) -> None:
    nested: dict[str, Any] = {}
    for _ in range(5000):
        nested = {"x": nested}
    with pytest.raises(ValidationError, match="nested too deeply"):
        NewEvent(type="Deep", data=nested)


def test_an_unvalidated_copy_with_bad_data_is_refused(store: Store, conn: Connection) -> None:
    """model_copy(update=...) skips pydantic's validation; the append checks the copy."""
    copy = NewEvent(type="Opened").model_copy(update={"data": {"ratio": float("nan")}})
    with invalid(conn, "events"):
        store.append("order-13", [copy], conn=conn)


@pytest.mark.parametrize(
    "update",
    [
        {"event_id": "zz"},
        {"schema_version": 0},
        {"schema_version": 2**40},
        {"type": "a\ud800"},
        {"type": ""},
        {"data": {"big": 1e20}},
    ],
    ids=[
        "event-id",
        "schema-version-0",
        "schema-version-huge",
        "surrogate-type",
        "empty-type",
        "big-float",
    ],
)
def test_every_field_of_an_unvalidated_copy_is_checked(
    store: Store, conn: Connection, update: dict[str, Any]
) -> None:
    copy = NewEvent(type="Opened").model_copy(update=update)
    with invalid(conn, "events"):
        store.append("order-14", [copy], conn=conn)


def test_a_float_below_the_exponent_form_round_trips(store: Store, conn: Connection) -> None:
    data = {"x": 9.9e15, "y": -1.5e15, "tiny": 1e-7, "text": "1e+16"}
    store.append("order-15", [NewEvent(type="Opened", data=data)], conn=conn)
    [stored] = store.read_stream("order-15", conn=conn)
    assert stored.data == data and all(type(stored.data[k]) is float for k in ("x", "y", "tiny"))


def test_a_float_read_back_as_an_int_is_refused_in_transition_data(
    store: Store, conn: Connection
) -> None:
    class Switch(Machine):
        name = "SwitchForFloats"
        off = State(initial=True)
        on = State()
        flip = off.to(on)

    store.register(Switch, conn=conn)
    store.create("switch-1", Switch, conn=conn)
    with invalid(conn, "data"):
        store.transition("switch-1", "flip", data={"big": 2e16}, conn=conn)
    head = store.stream_state("switch-1", conn=conn)
    assert head is not None and head.state == "off"


def test_a_batch_over_max_batch_bytes(store: Store, conn: Connection) -> None:
    capped = Store(store.engine, settings=Settings(max_batch_bytes=100))
    events = [NewEvent(type="Opened", data={"text": "x" * 30}) for _ in range(3)]  # 44 bytes
    with invalid(conn, "events"):
        capped.append("order-16", events, conn=conn)
    assert capped.append("order-16", events[:2], conn=conn).version == 2


def test_event_mapping_that_is_valid_is_accepted(store: Store, conn: Connection) -> None:
    event_id = uuid.uuid4()
    mapping: Any = {"type": "Opened", "data": {"a": 1}, "event_id": str(event_id)}
    store.append("order-2", [mapping], conn=conn)
    [stored] = store.read_stream("order-2", conn=conn)
    assert (stored.type, stored.data, stored.event_id) == ("Opened", {"a": 1}, event_id)


def test_text_that_looks_like_a_nul_escape_is_stored(store: Store, conn: Connection) -> None:
    data = {"path": "C:\\u0000dir", "escaped": "\\\\u0000"}
    store.append("order-3", [NewEvent(type="Opened", data=data)], conn=conn)
    [stored] = store.read_stream("order-3", conn=conn)
    assert stored.data == data


def test_payload_over_the_configured_limit(store: Store, conn: Connection) -> None:
    small = Store(store.engine, settings=Settings(max_event_bytes=100))
    # Size = data JSON + metadata JSON ("{}", 2 bytes), in UTF-8 bytes.
    fits = NewEvent(type="Opened", data={"text": "x" * 87})  # 98 + 2 bytes: at the limit
    too_big = NewEvent(type="Opened", data={"text": "x" * 88})  # 99 + 2 bytes
    with stores_nothing(conn), pytest.raises(InvalidInput) as caught:
        small.append("order-4", [fits, too_big], conn=conn)
    assert caught.value.detail == {"field": "events", "size": 101, "limit": 100}
    # Metadata counts towards the limit too, and multi-byte characters count as bytes.
    with invalid(conn, "events"):
        small.append(
            "order-4",
            [NewEvent(type="Opened", data={"a": "x" * 40}, metadata={"b": "y" * 50})],
            conn=conn,
        )
    with invalid(conn, "events"):
        small.append("order-4", [NewEvent(type="Opened", data={"t": "é" * 46})], conn=conn)
    assert small.append("order-4", [fits], conn=conn).version == 1


# --- expected versions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expected",
    [-5, -1, -2, True, False, "3", 1.0, None, 2**63, [1]],
    ids=[
        "-5",
        "raw-minus-1",
        "raw-minus-2",
        "true",
        "false",
        "str",
        "float",
        "none",
        "2**63",
        "list",
    ],
)
def test_bad_expected_version(store: Store, conn: Connection, expected: Any) -> None:
    with invalid(conn, "expected_version"):
        store.append("order-5", opened(), expected_version=expected, conn=conn)
    with invalid(conn, "expected_version"):
        store.check_version("order-5", expected, conn=conn)
    with invalid(conn, "expected_version"):
        store.append_many([StreamAppend("order-5", opened(), expected)], conn=conn)
    assert store.stream_state("order-5", conn=conn) is None


# --- batches -----------------------------------------------------------------------------------


def test_empty_batch(store: Store, conn: Connection) -> None:
    with invalid(conn, "events"):
        store.append("order-6", [], conn=conn)
    with invalid(conn, "events"):
        store.append_many([StreamAppend("order-6", [])], conn=conn)
    with invalid(conn, "appends"):
        store.append_many([], conn=conn)


def test_batch_over_max_batch(store: Store, conn: Connection) -> None:
    capped = Store(store.engine, settings=Settings(max_batch=3))
    with invalid(conn, "events"):
        capped.append("order-7", opened(4), conn=conn)
    assert capped.append("order-7", opened(3), conn=conn).version == 3


@pytest.mark.parametrize(
    "events",
    [
        NewEvent(type="Opened"),
        {"type": "Opened"},
        "Opened",
        b"Opened",
        None,
        42,
        {"Opened"},
        (e for e in opened()),
        ["Opened"],
        [None],
        [NewEvent(type="Opened"), 7],
    ],
    ids=[
        "one-event",
        "one-mapping",
        "str",
        "bytes",
        "none",
        "int",
        "set",
        "generator",
        "list-of-str",
        "list-of-none",
        "list-with-int",
    ],
)
def test_events_must_be_a_list_of_events(store: Store, conn: Connection, events: Any) -> None:
    with invalid(conn, "events"):
        store.append("order-8", events, conn=conn)


def test_same_event_twice_in_a_batch(store: Store, conn: Connection) -> None:
    event = NewEvent(type="Opened")
    with invalid(conn, "events"):
        store.append("order-9", [event, event], conn=conn)
    copy = NewEvent(type="Paid", event_id=event.event_id)
    with invalid(conn, "events"):
        store.append("order-9", [event, copy], conn=conn)


def test_same_stream_twice_in_append_many(store: Store, conn: Connection) -> None:
    with invalid(conn, "appends"):
        store.append_many(
            [StreamAppend("order-9", opened()), StreamAppend("order-9", opened())], conn=conn
        )
    with invalid(conn, "conditions"):
        store.append_many(
            [StreamAppend("order-9", opened())],
            conditions=[StreamCondition("order-9", 0)],
            conn=conn,
        )


# --- actor and traceparent ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "actor",
    [["agent"], "agent-1", {"at": object()}, {"score": float("nan")}, {"name": "a\x00"}],
    ids=["list", "str", "object", "nan", "nul"],
)
def test_bad_actor(store: Store, conn: Connection, actor: Any) -> None:
    with invalid(conn, "actor"):
        store.append("order-10", opened(), actor=actor, conn=conn)


def test_nul_in_traceparent(store: Store, conn: Connection) -> None:
    # Refused by the driver before sending; the transaction stays usable.
    with stores_nothing(conn), pytest.raises(InvalidInput):
        store.append("order-11", opened(), traceparent="00-a\x00b-01", conn=conn)
    assert store.stream_state("order-11", conn=conn) is None


# --- reads ---------------------------------------------------------------------------------


BAD_AFTER: list[Any] = [
    "",
    "abc",
    "1",
    "1:",
    ":1",
    "1:-2",
    "-1:2",
    "1:2:3",
    " 1:2",
    "1.5:2",
    "１:２",
    f"{2**64}:1",
    f"1:{2**63}",
    Position(-1, 0),
    Position(1, -1),
    Position(2**64, 0),
    Position(0, 2**63),
    Position("1", 2),  # type: ignore[arg-type]
    Position(1, 2.0),  # type: ignore[arg-type]
    Position(True, 2),
    12,
    (1, 2),
]


@pytest.mark.parametrize("after", BAD_AFTER, ids=[repr(a)[:30] for a in BAD_AFTER])
def test_bad_after(store: Store, conn: Connection, after: Any) -> None:
    with invalid(conn, "after"):
        store.read_all(after=after, conn=conn)
    with invalid(conn, "after"):
        store.read_category("order", after=after, conn=conn)


def test_largest_after_is_accepted(store: Store, conn: Connection) -> None:
    page = store.read_all(after=f"{2**64 - 1}:{2**63 - 1}", conn=conn)
    assert page.events == [] and page.last_position == Position(2**64 - 1, 2**63 - 1)


@pytest.mark.parametrize("limit", [0, -1, 100_001, True, "10", 1.5, None], ids=lambda v: repr(v))
def test_bad_limit_on_log_reads(store: Store, conn: Connection, limit: Any) -> None:
    with invalid(conn, "limit"):
        store.read_all(limit=limit, conn=conn)
    with invalid(conn, "limit"):
        store.read_category("order", limit=limit, conn=conn)


def test_limit_bounds_on_log_reads_are_accepted(store: Store, conn: Connection) -> None:
    assert store.read_all(limit=1, conn=conn).events == []
    assert store.read_all(limit=100_000, conn=conn).events == []


@pytest.mark.parametrize("limit", [0, -1, True, "10"], ids=lambda v: repr(v))
def test_bad_limit_on_read_stream(store: Store, conn: Connection, limit: Any) -> None:
    with invalid(conn, "limit"):
        store.read_stream("order-12", limit=limit, conn=conn)


@pytest.mark.parametrize("from_version", [-1, True, "1", 1.0], ids=lambda v: repr(v))
def test_bad_from_version(store: Store, conn: Connection, from_version: Any) -> None:
    with invalid(conn, "from_version"):
        store.read_stream("order-12", from_version=from_version, conn=conn)


@pytest.mark.parametrize(
    "types",
    [[], (), "Opened", [""], ["a\x00"], [1], ["x" * 201], ["t"] * 1001, {"Opened"}],
    ids=["empty", "empty-tuple", "str", "empty-name", "nul", "int", "long", "1001", "set"],
)
def test_bad_types_filter(store: Store, conn: Connection, types: Any) -> None:
    with invalid(conn, "types"):
        store.read_all(types=types, conn=conn)
    with invalid(conn, "types"):
        store.read_category("order", types=types, conn=conn)


@pytest.mark.parametrize(
    "category", ["", "x" * 201, "a\x00", 5, None], ids=["empty", "long", "nul", "int", "none"]
)
def test_bad_category(store: Store, conn: Connection, category: Any) -> None:
    with invalid(conn, "category"):
        store.read_category(category, conn=conn)


# --- tenants -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tenant",
    ["", "t" * 101, "a\x00b", 7, "\ud800"],
    ids=["empty", "101-chars", "nul", "int", "surrogate"],
)
def test_bad_tenant(store: Store, tenant: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        Store(store.engine, tenant=tenant)
    assert caught.value.detail == {"field": "tenant"}


def test_bad_tenant_in_settings() -> None:
    with pytest.raises(ValidationError):
        Settings(tenant="t" * 101)
    with pytest.raises(ValidationError):
        Settings(tenant="")


def test_longest_tenant_is_accepted(store: Store, conn: Connection) -> None:
    tenant = "t" * 100
    wide = Store(store.engine, tenant=tenant)
    wide.append("order-13", opened(), conn=conn)
    [stored] = wide.read_stream("order-13", conn=conn)
    assert stored.tenant == tenant
    assert store.read_stream("order-13", conn=conn) == []


# --- the SQL functions on their own ------------------------------------------------------------


APPEND_V1 = (
    "SELECT * FROM pgstate.append_v1(%(tenant)s, %(stream_id)s, %(expected)s,"
    " %(event_ids)s::uuid[], %(types)s::text[], %(data)s::text[], %(metadata)s::text[],"
    " %(schema_versions)s::integer[], %(causation_ids)s::uuid[],"
    " %(correlation_ids)s::uuid[], NULL, NULL)"
)


DUPLICATE_ID = uuid.uuid4()


def append_params(**overrides: Any) -> dict[str, Any]:
    ids = [uuid.uuid4(), uuid.uuid4()]
    params: dict[str, Any] = {
        "tenant": "default",
        "stream_id": "direct-1",
        "expected": -1,
        "event_ids": ids,
        "types": ["Opened", "Paid"],
        "data": ["{}", '{"a": 1}'],
        "metadata": [],
        "schema_versions": [],
        "causation_ids": [],
        "correlation_ids": [],
    }
    params.update(overrides)
    return params


def event_rows(connection: psycopg.Connection[Any]) -> int:
    row = connection.execute("SELECT count(*) FROM pgstate.events").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "overrides",
    [
        {"event_ids": [], "types": [], "data": []},
        {"event_ids": None, "types": None, "data": None},
        {"stream_id": None},
        {"stream_id": ""},
        {"stream_id": "x" * 201},
        {"tenant": None},
        {"tenant": "t" * 101},
        {"types": ["Opened"]},
        {"data": ['{"only": "one"}']},
        {"metadata": ["{}"]},
        {"schema_versions": [1, 1, 1]},
        {"causation_ids": [uuid.uuid4()]},
        {"expected": -5},
        {"expected": -3},
        {"expected": None},
        {"data": ['"a string"', "{}"]},
        {"data": ["{}", " [1, 2]"]},
        {"data": ["{}", None]},
        {"metadata": ["{}", "1"]},
        {"event_ids": [uuid.uuid4(), None]},
        {"event_ids": [DUPLICATE_ID, DUPLICATE_ID]},
        {"types": ["Opened", None]},
        {"types": ["Opened", ""]},
        {"types": ["Opened", "x" * 201]},
    ],
    ids=[
        "empty-arrays",
        "null-arrays",
        "null-stream",
        "empty-stream",
        "long-stream",
        "null-tenant",
        "long-tenant",
        "fewer-types",
        "fewer-data",
        "fewer-metadata",
        "more-schema-versions",
        "fewer-causation-ids",
        "expected-minus-5",
        "expected-minus-3",
        "expected-null",
        "data-string",
        "data-array",
        "data-null",
        "metadata-number",
        "null-event-id",
        "same-id-twice",
        "null-type",
        "empty-type",
        "long-type",
    ],
)
def test_append_v1_rejects_bad_input(pgstate_db: str, overrides: dict[str, Any]) -> None:
    with psycopg.connect(pgstate_db, autocommit=True) as connection:
        before = event_rows(connection)
        with pytest.raises(psycopg.Error) as caught:
            connection.execute(APPEND_V1, append_params(**overrides))
        assert caught.value.diag.sqlstate == "SM012", caught.value.diag.message_primary
        assert event_rows(connection) == before


MALFORMED = (
    "each event needs an id, a type of 1 to 200 characters and JSON objects as data and metadata"
)


@pytest.mark.parametrize(
    "overrides",
    [
        {"event_ids": [uuid.uuid4(), None]},
        {"data": ["{}", " [1, 2]"]},
        {"metadata": ["{}", "1"]},
        {"types": ["Opened", ""]},
    ],
    ids=["null-event-id", "data-array", "metadata-number", "empty-type"],
)
def test_a_malformed_batch_gets_the_single_events_error(
    pgstate_db: str, overrides: dict[str, Any]
) -> None:
    # The batch check and the single-event check refuse with the same message and detail.
    with psycopg.connect(pgstate_db, autocommit=True) as connection:
        before = event_rows(connection)
        with pytest.raises(psycopg.Error) as caught:
            connection.execute(APPEND_V1, append_params(**overrides))
        assert caught.value.diag.message_primary == MALFORMED
        assert json.loads(caught.value.diag.message_detail or "") == {"field": "events"}
        assert event_rows(connection) == before
        batch = append_params(**overrides)
        # The same malformed event alone (the second of each array, where it is given).
        single = {
            key: value[1:] if isinstance(value, list) and len(value) == 2 else value
            for key, value in batch.items()
        }
        with pytest.raises(psycopg.Error) as alone:
            connection.execute(APPEND_V1, single)
        assert alone.value.diag.message_primary == MALFORMED
        assert event_rows(connection) == before


def test_a_batch_accepts_json_objects_after_whitespace(pgstate_db: str) -> None:
    # The check takes the cheap test first ('{' at the start) and trims only when that
    # fails: text led by whitespace is still an object.
    stream_id = f"direct-{uuid.uuid4().hex[:8]}"
    params = append_params(
        stream_id=stream_id,
        data=[' \n\t{"a": 1}', "{}"],
        metadata=["\r {}", None],
    )
    with psycopg.connect(pgstate_db, autocommit=True) as connection:
        row = connection.execute(APPEND_V1, params).fetchone()
        assert row is not None and row[:2] == (1, 2)
        stored = connection.execute(
            "SELECT data, metadata FROM pgstate.events WHERE stream_id = %s ORDER BY version",
            (stream_id,),
        ).fetchall()
        assert stored == [({"a": 1}, {}), ({}, {})]


def malformed_batch_cases() -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """(appends made first, then the malformed call) per case; ids shared by a case's
    appends are the same objects."""
    a, b, stored = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    return {
        "at the wrong version": ([], {"expected": 3, "data": ["{}", "[]"]}),
        "with an unknown expected version": ([], {"expected": -3, "data": ["{}", "[]"]}),
        "with an id twice": ([], {"event_ids": [a, a], "data": ["{}", "[]"]}),
        "with an id twice and a missing one": (
            [],
            {"event_ids": [a, a, None], "types": ["A", "B", "C"], "data": ["{}"] * 3},
        ),
        "after a row that is not JSON": ([], {"expected": 0, "data": ["{bad", "[]"]}),
        "whose first id is stored": (
            [{"event_ids": [stored], "types": ["A"], "data": ["{}"], "expected": 0}],
            {"event_ids": [stored, b], "data": ["{}", "[]"]},
        ),
        "retrying a stored batch with bad metadata": (
            [{"event_ids": [a, b], "data": ["{}", "{}"], "expected": 0}],
            {"event_ids": [a, b], "data": ["{}", "{}"], "metadata": ["{}", "[1]"]},
        ),
    }


@pytest.mark.parametrize("case", list(malformed_batch_cases()))
def test_a_malformed_batch_is_refused_before_anything_else(pgstate_db: str, case: str) -> None:
    # Bad input is refused as bad input, whatever the stream's version, a stored retry or
    # another check would have said, and nothing is stored.
    setup, call = malformed_batch_cases()[case]
    stream_id = f"direct-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgstate_db, autocommit=True) as connection:
        for earlier in setup:
            connection.execute(APPEND_V1, append_params(stream_id=stream_id, **earlier))
        before = event_rows(connection)
        with pytest.raises(psycopg.Error) as caught:
            connection.execute(APPEND_V1, append_params(stream_id=stream_id, **call))
        assert caught.value.diag.sqlstate == "SM012", caught.value.diag.message_primary
        assert caught.value.diag.message_primary == MALFORMED
        assert event_rows(connection) == before


def test_append_v1_rejects_a_batch_over_10000(pgstate_db: str) -> None:
    count = 10_001
    params = append_params(
        event_ids=[uuid.uuid4() for _ in range(count)],
        types=["Opened"] * count,
        data=["{}"] * count,
    )
    with psycopg.connect(pgstate_db, autocommit=True) as connection:
        before = event_rows(connection)
        with pytest.raises(psycopg.Error) as caught:
            connection.execute(APPEND_V1, params)
        assert caught.value.diag.sqlstate == "SM012"
        assert event_rows(connection) == before


def test_append_v1_accepts_the_same_call_when_well_formed(pgstate_db: str) -> None:
    # The control for the cases above: the base parameters are valid.
    stream_id = f"direct-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgstate_db) as connection:
        row = connection.execute(APPEND_V1, append_params(stream_id=stream_id)).fetchone()
        assert row is not None and row[:2] == (1, 2)
        connection.rollback()


def test_check_version_v1_rejects_bad_input(pgstate_db: str) -> None:
    with psycopg.connect(pgstate_db, autocommit=True) as connection:
        for params in [("default", "s-1", -5), ("default", None, 0), (None, "s-1", 0)]:
            with pytest.raises(psycopg.Error) as caught:
                connection.execute("SELECT pgstate.check_version_v1(%s, %s, %s)", params)
            assert caught.value.diag.sqlstate == "SM012", params


@pytest.mark.parametrize(
    "traceparent", [5, "00-\ud800-01", "x" * 513], ids=["int", "surrogate", "513-chars"]
)
def test_bad_traceparent_on_appends(store: Store, conn: Connection, traceparent: Any) -> None:
    with invalid(conn, "traceparent"):
        store.append("order-12", opened(), traceparent=traceparent, conn=conn)
    with invalid(conn, "traceparent"):
        store.append_many([StreamAppend("order-12", opened())], traceparent=traceparent, conn=conn)


@pytest.mark.parametrize(
    ("field", "appends", "conditions"),
    [
        ("appends", "order-13", ()),
        ("appends", [("order-13", opened())], ()),
        ("conditions", [StreamAppend("order-13", opened())], ["order-14"]),
        ("conditions", [StreamAppend("order-13", opened())], "order-14"),
    ],
    ids=["appends-str", "appends-tuples", "conditions-str-items", "conditions-str"],
)
def test_append_many_takes_its_own_types(
    store: Store, conn: Connection, field: str, appends: Any, conditions: Any
) -> None:
    with invalid(conn, field):
        store.append_many(appends, conditions=conditions, conn=conn)


def test_append_many_reads_a_generator_once(store: Store, conn: Connection) -> None:
    appends = (StreamAppend(f"order-{n}", opened()) for n in (15, 16))
    results = store.append_many(appends, conn=conn)
    assert [r.stream_id for r in results] == ["order-15", "order-16"]


@pytest.mark.parametrize(
    ("position", "timeout", "field"),
    [
        (Position(1, 1), float("nan"), "timeout"),
        (Position(1, 1), None, "timeout"),
        (Position(1, 1), -1, "timeout"),
        (Position(1, 1), float("inf"), "timeout"),
        ("not-a-position", 1.0, "after"),
        (None, 1.0, "position"),
    ],
)
def test_bad_waits_are_invalid_input(store: Store, position: Any, timeout: Any, field: str) -> None:
    """A NaN timeout used to wait forever; a string position, as read_all takes, works."""
    with pytest.raises(InvalidInput) as caught:
        store.wait_for(position, timeout=timeout)
    assert caught.value.detail["field"] == field


def test_a_wait_takes_a_position_as_text(store: Store) -> None:
    store.wait_for("1:0", timeout=5)


@pytest.mark.parametrize("interval", [0, -1, float("nan"), "1", True])
def test_bad_listener_poll_interval(pgstate_db: str, interval: Any) -> None:
    from pgstate.listen import Listener

    with pytest.raises(InvalidInput) as caught:
        Listener(pgstate_db, poll_interval=interval)
    assert caught.value.detail == {"field": "poll_interval"}
