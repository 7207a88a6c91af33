"""append_one_v3 (the scalar single-event append) and its wrappers append_one_v2 and
append_one_v1 answer every call exactly as append_v2 and append_v1 with one-element arrays
do: same results, same retries, same SQLSTATEs, nothing stored on refusal. Each case runs
against every function on twin streams of the same history; 'return' answers a conflict
with the refusal 'raise' raises."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgstate import Store
from pgstate._connect import libpq_dsn
from pgstate.triage import Ticket

ONE = """SELECT from_version, to_version, duplicate FROM pgstate.append_one_v1(
    'default', %(stream)s, %(expected)s, %(id)s, %(type)s, %(data)s, NULL, NULL, NULL, NULL,
    NULL, NULL)"""
ONE_V2 = ONE.replace("append_one_v1", "append_one_v2")
ONE_V3 = """SELECT from_version, to_version, duplicate FROM pgstate.append_one_v3(
    'default', %(stream)s, %(expected)s, %(id)s, %(type)s, %(data)s, NULL, NULL, NULL, NULL,
    NULL, NULL, %(on_conflict)s)"""
MANY = """SELECT from_version, to_version, duplicate FROM pgstate.append_v1(
    'default', %(stream)s, %(expected)s, ARRAY[%(id)s::uuid], ARRAY[%(type)s::text],
    ARRAY[%(data)s::text], NULL, NULL, NULL, NULL, NULL, NULL)"""
MANY_V2 = """SELECT from_version, to_version, duplicate FROM pgstate.append_v2(
    'default', %(stream)s, %(expected)s, ARRAY[%(id)s::uuid], ARRAY[%(type)s::text],
    ARRAY[%(data)s::text], NULL, NULL, NULL, NULL, NULL, NULL, %(on_conflict)s)"""
# The conflict answered as a row: the refusal's columns, and a version column left NULL.
RETURNED_ONE = """SELECT code, message, detail, from_version FROM pgstate.append_one_v3(
    'default', %(stream)s, %(expected)s, %(id)s, 'A', '{}', NULL, NULL, NULL, NULL, NULL,
    NULL, 'return')"""
RETURNED_MANY = """SELECT code, message, detail, from_version FROM pgstate.append_v2(
    'default', %(stream)s, %(expected)s, ARRAY[%(id)s::uuid], ARRAY['A'], ARRAY['{}'], NULL,
    NULL, NULL, NULL, NULL, NULL, 'return')"""

FIRST_ID = uuid.UUID("00000000-0000-7000-8000-000000000001")
# (name, history appended first as (id, expected), then the call: id, expected, type, data)
CASES: dict[str, tuple[list[tuple[uuid.UUID, int]], tuple[Any, Any, Any, Any]]] = {
    "new stream": ([], (uuid.uuid4(), 0, "A", "{}")),
    "exact version": ([(FIRST_ID, 0)], (uuid.uuid4(), 1, "A", '{"k": 1}')),
    "any": ([(FIRST_ID, 0)], (uuid.uuid4(), -1, "A", "{}")),
    "any on a new stream": ([], (uuid.uuid4(), -1, "A", "{}")),
    "exists": ([(FIRST_ID, 0)], (uuid.uuid4(), -2, "A", "{}")),
    "exists but missing": ([], (uuid.uuid4(), -2, "A", "{}")),
    "wrong version": ([(FIRST_ID, 0)], (uuid.uuid4(), 3, "A", "{}")),
    "no stream but exists": ([(FIRST_ID, 0)], (uuid.uuid4(), 0, "A", "{}")),
    "retry, exact": ([(FIRST_ID, 0)], (FIRST_ID, 0, "A", "{}")),
    "retry, any": ([(FIRST_ID, 0)], (FIRST_ID, -1, "A", "{}")),
    "same id, other body": ([(FIRST_ID, 0)], (FIRST_ID, 0, "A", '{"other": true}')),
    "empty type": ([], (uuid.uuid4(), 0, "", "{}")),
    "long type": ([], (uuid.uuid4(), 0, "T" * 201, "{}")),
    "data not an object": ([], (uuid.uuid4(), 0, "A", "[1]")),
    "no id": ([], (None, 0, "A", "{}")),
    "unknown expected": ([], (uuid.uuid4(), -3, "A", "{}")),
}


def twin_id(event_id: uuid.UUID | None, rename: dict[uuid.UUID, uuid.UUID]) -> Any:
    """The id a twin sends: its own copy of the history's id, a fresh one otherwise."""
    if event_id is None:
        return None
    return rename.get(event_id) or uuid.uuid4()


@pytest.fixture
def sql_conn(pgstate_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as connection:
        yield connection


def outcome(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> Any:
    try:
        return conn.execute(statement, params).fetchone()
    except psycopg.Error as error:
        return error.sqlstate


def stored(conn: psycopg.Connection[Any], stream: str) -> Any:
    return conn.execute(
        "SELECT (SELECT count(*) FROM pgstate.events WHERE stream_id = %(s)s),"
        " (SELECT version FROM pgstate.streams WHERE stream_id = %(s)s)",
        {"s": stream},
    ).fetchone()


def run_case(
    conn: psycopg.Connection[Any], statement: str, case: str, prefix: str
) -> tuple[Any, Any, Any]:
    """Replay the case's history on a new stream, then make its call with ``statement``.
    Returns the answer and the stream's (event count, version) before and after the call.
    Each run has ids of its own (ids are unique across the log); the case's repeated id
    maps to the run's copy of the history's id."""
    history, (event_id, expected, event_type, data) = CASES[case]
    stream = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rename = {FIRST_ID: uuid.uuid4()}
    for stored_id, stored_expected in history:
        params = {"stream": stream, "expected": stored_expected, "type": "A", "data": "{}"}
        conn.execute(ONE, {**params, "id": rename[stored_id]})
    before = stored(conn, stream)
    params = {
        "stream": stream,
        "expected": expected,
        "id": twin_id(event_id, rename),
        "type": event_type,
        "data": data,
    }
    answer = outcome(conn, statement, {**params, "on_conflict": "raise"})
    return answer, before, stored(conn, stream)


@pytest.mark.parametrize("case", list(CASES))
def test_append_one_answers_as_append_v1(sql_conn: psycopg.Connection[Any], case: str) -> None:
    answers = []
    statements = [("one", ONE), ("two", ONE_V2), ("three", ONE_V3), ("many", MANY)]
    for tag, statement in [*statements, ("many2", MANY_V2)]:
        answer, before, after = run_case(sql_conn, statement, case, f"parity{tag}")
        if isinstance(answer, str):  # refused: nothing changed
            assert after == before, (case, tag)
        answers.append(answer)
    assert all(answer == answers[0] for answer in answers), (case, answers)


def test_append_one_expected_outcomes(sql_conn: psycopg.Connection[Any]) -> None:
    # The parity above could hold with both wrong; pin the main answers down.
    expected = {
        "new stream": (1, 1, False),
        "exact version": (2, 2, False),
        "exists but missing": "SM004",
        "wrong version": "SM004",
        "retry, exact": (1, 1, True),
        "retry, any": (1, 1, True),
        "same id, other body": "SM006",
        "data not an object": "SM012",
        "no id": "SM012",
        "unknown expected": "SM012",
    }
    for case, answer in expected.items():
        assert run_case(sql_conn, ONE, case, "pinned")[0] == answer, case


def test_append_one_stores_the_row_and_head(sql_conn: psycopg.Connection[Any]) -> None:
    event_id = uuid.uuid4()
    sql_conn.execute(
        ONE, {"stream": "order-77", "expected": 0, "id": event_id, "type": "Placed", "data": "{}"}
    )
    row = sql_conn.execute(
        "SELECT e.category, e.schema_version, e.metadata::text, e.version, s.version,"
        " s.last_tx = e.tx FROM pgstate.events e JOIN pgstate.streams s"
        " USING (tenant, stream_id) WHERE e.event_id = %s",
        (event_id,),
    ).fetchone()
    assert row == ("order", 1, "{}", 1, 1, True)


def test_append_one_refuses_a_machine_instance(
    store: Store, sql_conn: psycopg.Connection[Any]
) -> None:
    store.register(Ticket)
    store.create("ticket-parity", Ticket)
    before = stored(sql_conn, "ticket-parity")
    params = {"stream": "ticket-parity", "expected": 1, "type": "A", "data": "{}"}
    assert outcome(sql_conn, ONE, {**params, "id": uuid.uuid4()}) == "SM012"
    assert outcome(sql_conn, MANY, {**params, "id": uuid.uuid4()}) == "SM012"
    assert stored(sql_conn, "ticket-parity") == before


@pytest.mark.parametrize("expected", [0, 3])
def test_a_conflict_reads_as_append_v1s(sql_conn: psycopg.Connection[Any], expected: int) -> None:
    # append_one_v3 (here through its wrapper append_one_v2) refuses a plain conflict
    # itself: same message, same head row in detail as the batch function.
    stream = f"conflict-{uuid.uuid4().hex[:8]}"
    first = {"stream": stream, "expected": 0, "id": uuid.uuid4(), "type": "A", "data": "{}"}
    sql_conn.execute(ONE_V2, first)
    refusals = []
    for statement in (ONE_V2, MANY):
        params = {**first, "expected": expected, "id": uuid.uuid4()}
        with pytest.raises(psycopg.Error) as refused:
            sql_conn.execute(statement, params)
        diagnostic = refused.value.diag
        refusals.append(
            (refused.value.sqlstate, diagnostic.message_primary, diagnostic.message_detail)
        )
    assert refusals[0] == refusals[1]
    assert refusals[0][0] == "SM004"
    assert stored(sql_conn, stream) == (1, 1)


@pytest.mark.parametrize("expected", [0, 3, -2])
def test_a_returned_conflict_is_the_raised_one(
    sql_conn: psycopg.Connection[Any], expected: int
) -> None:
    # 'return' answers a conflict with the refusal 'raise' raises: same SQLSTATE, message
    # and detail (the head row and the expected version), and nothing stored.
    stream = f"returned-{uuid.uuid4().hex[:8]}"
    if expected != -2:
        first = {"stream": stream, "expected": 0, "id": uuid.uuid4(), "type": "A", "data": "{}"}
        sql_conn.execute(ONE_V2, first)
    params = {"stream": stream, "expected": expected, "type": "A", "data": "{}"}
    before = stored(sql_conn, stream)
    with pytest.raises(psycopg.Error) as refused:
        sql_conn.execute(ONE_V2, {**params, "id": uuid.uuid4()})
    diagnostic = refused.value.diag
    raised = (refused.value.sqlstate, diagnostic.message_primary)
    raised_detail = json.loads(diagnostic.message_detail or "")
    assert raised[0] == "SM004" and raised_detail["expected_version"] == expected
    for statement in (RETURNED_ONE, RETURNED_MANY):
        row = sql_conn.execute(statement, {**params, "id": uuid.uuid4()}).fetchone()
        assert row is not None
        code, message, detail, from_version = row
        assert ((code, message), detail, from_version) == (raised, raised_detail, None)
    assert stored(sql_conn, stream) == before


@pytest.mark.parametrize("on_conflict", [None, "ignore"])
def test_an_unknown_on_conflict_is_refused(
    sql_conn: psycopg.Connection[Any], on_conflict: str | None
) -> None:
    stream = f"unknown-{uuid.uuid4().hex[:8]}"
    params = {"stream": stream, "expected": 0, "type": "A", "data": "{}"}
    for statement in (ONE_V3, MANY_V2):
        answer = outcome(
            sql_conn, statement, {**params, "id": uuid.uuid4(), "on_conflict": on_conflict}
        )
        assert answer == "SM012", statement
    assert stored(sql_conn, stream) == (0, None)
    # With bad input as well, both functions name the input first.
    messages = []
    for statement in (ONE_V3, MANY_V2):
        params = {**params, "id": uuid.uuid4(), "type": "", "on_conflict": on_conflict}
        with pytest.raises(psycopg.Error) as refused:
            sql_conn.execute(statement, params)
        messages.append(refused.value.diag.message_primary)
    assert messages[0] == messages[1], messages
    assert "on_conflict" not in (messages[0] or "")
