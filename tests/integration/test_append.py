"""Append: expected versions, idempotent retries, multi-stream atomicity, caller's transaction."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from pgstate import (
    ExpectedVersion,
    IdempotencyKeyReused,
    NewEvent,
    Store,
    StreamAppend,
    StreamCondition,
    VersionConflict,
)


def opened(n: int = 1) -> list[NewEvent]:
    return [NewEvent(type="Opened", data={"n": i}) for i in range(n)]


def test_append_new_stream_then_exact_version(store: Store, conn: Connection) -> None:
    first = store.append(
        "order-1", opened(2), expected_version=ExpectedVersion.NO_STREAM, conn=conn
    )
    assert (first.from_version, first.version, first.duplicate) == (1, 2, False)
    assert first.first_position.tx == first.last_position.tx
    assert first.last_position.pos == first.first_position.pos + 1
    second = store.append("order-1", opened(), expected_version=2, conn=conn)
    assert (second.from_version, second.version) == (3, 3)
    events = store.read_stream("order-1", conn=conn)
    assert [e.version for e in events] == [1, 2, 3]
    assert [e.data for e in events] == [{"n": 0}, {"n": 1}, {"n": 0}]
    assert {e.tenant for e in events} == {"default"}


def test_append_any_and_stream_exists(store: Store, conn: Connection) -> None:
    assert store.append("order-2", opened(), conn=conn).version == 1
    assert store.append("order-2", opened(), conn=conn).version == 2
    result = store.append(
        "order-2", opened(), expected_version=ExpectedVersion.STREAM_EXISTS, conn=conn
    )
    assert result.version == 3


def test_stream_exists_on_missing_stream_conflicts(store: Store, conn: Connection) -> None:
    # A savepoint around the call works too, though a conflict no longer needs one.
    with pytest.raises(VersionConflict) as caught, conn.begin_nested():
        store.append("order-3", opened(), expected_version=ExpectedVersion.STREAM_EXISTS, conn=conn)
    assert caught.value.current_version == 0
    assert caught.value.sqlstate == "SM004"
    assert store.stream_state("order-3", conn=conn) is None
    for events in (opened(), opened(2)):
        with pytest.raises(VersionConflict) as again:
            store.append(
                "order-3", events, expected_version=ExpectedVersion.STREAM_EXISTS, conn=conn
            )
        assert again.value.message == "stream order-3 is at version 0, expected an existing stream"
    assert store.stream_state("order-3", conn=conn) is None


@pytest.mark.parametrize("size", [1, 3])
def test_a_conflict_leaves_the_callers_transaction_usable(fresh_store: Store, size: int) -> None:
    # A version conflict is an answer, not a failure of the transaction: the caller catches
    # it, appends at the version it carries, and commits what it did before and after.
    fresh_store.append("order-30", opened())
    with fresh_store.engine.begin() as conn:
        fresh_store.append("order-31", opened(), conn=conn)
        with pytest.raises(VersionConflict) as caught:
            fresh_store.append("order-30", opened(size), expected_version=0, conn=conn)
        current = caught.value.current_version
        assert current == 1
        fresh_store.append("order-30", opened(size), expected_version=current, conn=conn)
    assert [e.version for e in fresh_store.read_stream("order-30")] == list(range(1, size + 2))
    assert len(fresh_store.read_stream("order-31")) == 1


def test_a_conflict_inside_append_many_aborts_the_callers_transaction(
    fresh_store: Store,
) -> None:
    # A multi-stream write is all or nothing: the stream appended before the conflict must
    # not commit, even if the caller catches the error and commits.
    fresh_store.append("acct-d", opened())
    with fresh_store.engine.connect() as conn:
        conn.begin()
        with pytest.raises(VersionConflict):
            fresh_store.append_many(
                [
                    StreamAppend("acct-c", opened(), ExpectedVersion.NO_STREAM),
                    StreamAppend("acct-d", opened(), 0),
                ],
                conn=conn,
            )
        with pytest.raises(DBAPIError) as aborted:
            conn.execute(text("SELECT 1"))
        assert isinstance(aborted.value.orig, psycopg.errors.InFailedSqlTransaction)
        conn.rollback()
    assert fresh_store.stream_state("acct-c") is None


def test_version_conflict_carries_head_and_stores_nothing(store: Store, conn: Connection) -> None:
    store.append("order-4", opened(3), conn=conn)
    with pytest.raises(VersionConflict) as caught:
        store.append("order-4", opened(), expected_version=1, conn=conn)
    error = caught.value
    assert (error.stream_id, error.current_version, error.expected_version) == ("order-4", 3, 1)
    assert error.detail["category"] == "order"


def test_conflict_in_own_transaction_leaves_stream_unchanged(fresh_store: Store) -> None:
    fresh_store.append("order-5", opened(2))
    with pytest.raises(VersionConflict):
        fresh_store.append("order-5", opened(5), expected_version=ExpectedVersion.NO_STREAM)
    assert [e.version for e in fresh_store.read_stream("order-5")] == [1, 2]
    state = fresh_store.stream_state("order-5")
    assert state is not None and state.version == 2


def test_conflicts_burn_no_positions(fresh_store: Store) -> None:
    first = fresh_store.append("order-6", opened())
    for _ in range(3):
        with pytest.raises(VersionConflict):
            fresh_store.append("order-6", opened(), expected_version=0)
    second = fresh_store.append("order-6", opened(), expected_version=1)
    assert second.first_position.pos == first.last_position.pos + 1


def test_retry_with_same_ids_returns_original_result(store: Store, conn: Connection) -> None:
    batch = opened(2)
    original = store.append("order-7", batch, expected_version=0, conn=conn)
    store.append("order-7", opened(), expected_version=2, conn=conn)
    retried = store.append("order-7", batch, expected_version=0, conn=conn)
    assert retried.duplicate is True
    assert (retried.from_version, retried.version) == (original.from_version, original.version)
    assert retried.first_position == original.first_position
    assert retried.last_position == original.last_position
    assert len(store.read_stream("order-7", conn=conn)) == 3


def test_retry_with_any_expected_is_idempotent(store: Store, conn: Connection) -> None:
    batch = opened(1)
    original = store.append("order-8", batch, conn=conn)
    retried = store.append("order-8", batch, conn=conn)
    assert retried.duplicate and retried.version == original.version == 1
    assert len(store.read_stream("order-8", conn=conn)) == 1


def test_same_id_with_different_body_raises(store: Store, conn: Connection) -> None:
    event = NewEvent(type="Opened", data={"a": 1})
    store.append("order-9", [event], expected_version=0, conn=conn)
    changed = NewEvent(type="Opened", data={"a": 2}, event_id=event.event_id)
    with pytest.raises(IdempotencyKeyReused) as caught:
        store.append("order-9", [changed], expected_version=0, conn=conn)
    assert caught.value.current_version == 1


@pytest.mark.parametrize("expected", [0, ExpectedVersion.ANY], ids=["exact", "any"])
def test_the_same_ids_in_another_order_are_another_request(
    store: Store, conn: Connection, expected: int
) -> None:
    first, second = NewEvent(type="Opened"), NewEvent(type="Opened")
    store.append("order-14", [first, second], expected_version=expected, conn=conn)
    with pytest.raises(IdempotencyKeyReused), conn.begin_nested():
        store.append("order-14", [second, first], expected_version=expected, conn=conn)
    retried = store.append("order-14", [first, second], expected_version=expected, conn=conn)
    assert retried.duplicate and (retried.from_version, retried.version) == (1, 2)


def test_same_id_on_another_stream_raises(store: Store, conn: Connection) -> None:
    event = NewEvent(type="Opened", data={})
    store.append("order-10", [event], conn=conn)
    with pytest.raises(IdempotencyKeyReused):
        store.append("order-11", [event], expected_version=0, conn=conn)


def test_partial_overlap_of_ids_raises(store: Store, conn: Connection) -> None:
    first, second = opened(2)
    store.append("order-12", [first], conn=conn)
    with pytest.raises(IdempotencyKeyReused):
        store.append("order-12", [first, second], expected_version=0, conn=conn)


def test_append_many_is_atomic(fresh_store: Store) -> None:
    fresh_store.append("acct-b", opened())
    with pytest.raises(VersionConflict) as caught:
        fresh_store.append_many(
            [
                StreamAppend("acct-a", opened(), ExpectedVersion.NO_STREAM),
                StreamAppend("acct-b", opened(), 5),
            ]
        )
    assert caught.value.stream_id == "acct-b"
    assert fresh_store.stream_state("acct-a") is None
    results = fresh_store.append_many(
        [
            StreamAppend("acct-b", opened(), 1),
            StreamAppend("acct-a", opened(2), ExpectedVersion.NO_STREAM),
        ]
    )
    assert [(r.stream_id, r.version) for r in results] == [("acct-b", 2), ("acct-a", 2)]
    assert results[0].last_position.tx == results[1].last_position.tx


def test_append_many_condition_on_unwritten_stream(fresh_store: Store) -> None:
    fresh_store.append("policy-1", opened())
    with pytest.raises(VersionConflict):
        fresh_store.append_many(
            [StreamAppend("claim-1", opened(), ExpectedVersion.NO_STREAM)],
            conditions=[StreamCondition("policy-1", 7)],
        )
    assert fresh_store.stream_state("claim-1") is None
    [result] = fresh_store.append_many(
        [StreamAppend("claim-1", opened(), ExpectedVersion.NO_STREAM)],
        conditions=[StreamCondition("policy-1", 1)],
    )
    assert result.version == 1
    policy = fresh_store.stream_state("policy-1")
    assert policy is not None and policy.version == 1


def test_caller_transaction_commits_domain_write_with_append(fresh_store: Store) -> None:
    with fresh_store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id text PRIMARY KEY, total int)"))
    with fresh_store.engine.begin() as conn:
        fresh_store.append("order-20", opened(), expected_version=0, conn=conn)
        conn.execute(text("INSERT INTO orders VALUES ('order-20', 42)"))
    with fresh_store.engine.connect() as conn:
        assert conn.execute(text("SELECT total FROM orders")).scalar_one() == 42
    assert len(fresh_store.read_stream("order-20")) == 1


def test_caller_rollback_discards_append(fresh_store: Store) -> None:
    with fresh_store.engine.connect() as conn:
        fresh_store.append("order-21", opened(), conn=conn)
        assert len(fresh_store.read_stream("order-21", conn=conn)) == 1
        conn.rollback()
    assert fresh_store.read_stream("order-21") == []
    assert fresh_store.stream_state("order-21") is None


def test_a_page_mixing_events_with_and_without_metadata_keeps_each_its_own(
    store: Store, conn: Connection
) -> None:
    # Metadata is decoded a page at a time: each event must get its own back, or none.
    given: list[dict[str, object]] = [{}, {"n": 1}, {}, {}, {"n": 4, "big": 2**70 + 1}, {"n": 5}]
    batch = [NewEvent(type="Noted", data={"i": i}, metadata=m) for i, m in enumerate(given)]
    store.append("order-23", batch, conn=conn)
    stored = store.read_stream("order-23", conn=conn)
    assert [dict(event.metadata) for event in stored] == given
    assert [event.data for event in stored] == [{"i": i} for i in range(len(given))]


def test_metadata_causation_actor_stored(store: Store, conn: Connection) -> None:
    cause, correlation = uuid.uuid4(), uuid.uuid4()
    event = NewEvent(
        type="Paid",
        data={"amount": 10},
        metadata={"source": "api"},
        causation_id=cause,
        correlation_id=correlation,
        schema_version=2,
    )
    store.append(
        "order-22", [event], actor={"agent": "billing-1"}, traceparent="00-ab-cd-01", conn=conn
    )
    [stored] = store.read_stream("order-22", conn=conn)
    assert stored.event_id == event.event_id
    assert stored.metadata == {"source": "api"}
    assert (stored.causation_id, stored.correlation_id) == (cause, correlation)
    assert stored.actor == {"agent": "billing-1"}
    assert stored.traceparent == "00-ab-cd-01"
    assert stored.schema_version == 2


def test_tenants_are_isolated(store: Store, conn: Connection) -> None:
    other = Store(store.engine, tenant="acme")
    store.append("ticket-1", opened(), expected_version=0, conn=conn)
    assert other.append("ticket-1", opened(2), expected_version=0, conn=conn).version == 2
    assert len(store.read_stream("ticket-1", conn=conn)) == 1
    assert len(other.read_stream("ticket-1", conn=conn)) == 2


@pytest.mark.parametrize("condition_stream", ["aaa-policy", "zzz-policy"])
def test_a_retry_of_a_stored_append_many_is_a_duplicate_after_its_condition_moved_on(
    fresh_store: Store, condition_stream: str
) -> None:
    """Whichever way the streams sort, a retry of a write that was stored (say after a lost
    connection) gets the stored result, although its condition no longer holds; a new
    write under that condition is refused and stores nothing."""
    fresh_store.append(condition_stream, opened())
    events = opened(2)
    request = [StreamAppend("mmm-claim", events, ExpectedVersion.NO_STREAM)]
    conditions = [StreamCondition(condition_stream, 1)]
    [stored] = fresh_store.append_many(request, conditions=conditions)
    fresh_store.append(condition_stream, opened(), expected_version=1)
    [retried] = fresh_store.append_many(request, conditions=conditions)
    assert retried.duplicate and not stored.duplicate
    assert (retried.version, retried.last_position) == (stored.version, stored.last_position)
    with pytest.raises(VersionConflict) as caught:
        fresh_store.append_many([StreamAppend("mmm-claim", opened(), 2)], conditions=conditions)
    assert caught.value.stream_id == condition_stream
    assert [e.event_id for e in fresh_store.read_stream("mmm-claim")] == [
        e.event_id for e in events
    ]
