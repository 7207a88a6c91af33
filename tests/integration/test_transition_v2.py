"""transition_v2's three answers to a rejection, and the client side of 'return': the typed
error is raised by Python, nothing is written, and the caller's transaction stays usable."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgstate import StaleState, Store
from pgstate._connect import libpq_dsn
from pgstate.machine import Machine, State

CALL = """SELECT o_outcome, o_code, o_detail ->> 'state', o_version FROM pgstate.transition_v2(
    'default', %(stream)s, 'go', %(expected)s, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL, NULL, NULL, false, %(mode)s, NULL)"""


class Door(Machine):
    closed = State(initial=True)
    open = State()
    gone = State(final=True)

    go = closed.to(open)
    shut = open.to(closed)
    remove = open.to(gone)


@pytest.fixture
def door(store: Store) -> str:
    store.register(Door)
    stream = f"door-{uuid.uuid4().hex[:8]}"
    store.create(stream, Door)
    return stream


@pytest.fixture
def sql_conn(pgstate_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as connection:
        yield connection


def written(conn: psycopg.Connection[Any], stream: str) -> Any:
    return conn.execute(
        "SELECT (SELECT count(*) FROM pgstate.events WHERE stream_id = %(s)s),"
        " (SELECT count(*) FROM pgstate.rejections WHERE stream_id = %(s)s),"
        " (SELECT version FROM pgstate.streams WHERE stream_id = %(s)s)",
        {"s": stream},
    ).fetchone()


def test_return_mode_writes_nothing(door: str, sql_conn: psycopg.Connection[Any]) -> None:
    before = written(sql_conn, door)
    row = sql_conn.execute(CALL, {"stream": door, "expected": "open", "mode": "return"})
    assert row.fetchone() == ("rejected", "SM003", "closed", 1)
    assert written(sql_conn, door) == before


def test_record_mode_records_and_raise_mode_raises(
    door: str, sql_conn: psycopg.Connection[Any]
) -> None:
    events, rejections, version = written(sql_conn, door)
    row = sql_conn.execute(CALL, {"stream": door, "expected": "open", "mode": "record"})
    assert row.fetchone() == ("rejected", "SM003", "closed", 1)
    assert written(sql_conn, door) == (events, rejections + 1, version)
    with pytest.raises(psycopg.Error) as raised:
        sql_conn.execute(CALL, {"stream": door, "expected": "open", "mode": "raise"})
    assert raised.value.sqlstate == "SM003"
    with pytest.raises(psycopg.Error) as bogus:
        sql_conn.execute(CALL, {"stream": door, "expected": "closed", "mode": "bogus"})
    assert bogus.value.sqlstate == "SM012"
    assert written(sql_conn, door) == (events, rejections + 1, version)


def test_rejection_leaves_the_callers_transaction_usable(
    store: Store, door: str, pgstate_db: str
) -> None:
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:
        with pytest.raises(StaleState) as stale:
            store.transition(door, "go", expected_state="open", conn=conn)
        assert stale.value.current_state == "closed"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        store.transition(door, "go", expected_state="closed", conn=conn)
        conn.commit()
    head = store.stream_state(door)
    assert head is not None and head.state == "open" and head.version == 2
    # transition() records nothing; try_transition() records its rejection.
    assert not store.history(door).rejections
    store.try_transition(door, "go", expected_state="closed")
    assert [r.code for r in store.history(door).rejections] == ["SM003"]
