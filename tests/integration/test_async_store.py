"""AsyncStore: the core behaviours of the store, awaited: append, conflicts, idempotent
retries, reads, multi-stream appends, the head row, and running inside the caller's async
transaction (SQLAlchemy AsyncConnection / AsyncSession, or a psycopg AsyncConnection)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pgstate import (
    AsyncStore,
    ExpectedVersion,
    IdempotencyKeyReused,
    InvalidInput,
    NewEvent,
    Position,
    RecordedEvent,
    StreamAppend,
    StreamCondition,
    VersionConflict,
)


def opened(n: int = 1, kind: str = "Opened") -> list[NewEvent]:
    return [NewEvent(type=kind, data={"n": i}) for i in range(n)]


async def test_append_and_read_stream(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    first = await store.append("order-1", opened(2), expected_version=ExpectedVersion.NO_STREAM)
    assert (first.stream_id, first.from_version, first.version, first.duplicate) == (
        "order-1",
        1,
        2,
        False,
    )
    assert first.last_position.pos == first.first_position.pos + 1
    second = await store.append("order-1", opened(1, "Paid"), expected_version=2)
    assert (second.from_version, second.version) == (3, 3)
    assert second.first_position > first.last_position

    events = await store.read_stream("order-1")
    assert [(e.version, e.type, e.data) for e in events] == [
        (1, "Opened", {"n": 0}),
        (2, "Opened", {"n": 1}),
        (3, "Paid", {"n": 0}),
    ]
    backwards = await store.read_stream("order-1", backwards=True, limit=2)
    assert [e.version for e in backwards] == [3, 2]
    middle = await store.read_stream("order-1", from_version=2, limit=1)
    assert [e.version for e in middle] == [2]
    assert await store.read_stream("order-404") == []


async def test_version_conflict(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    await store.append("order-2", opened(3))
    with pytest.raises(VersionConflict) as caught:
        await store.append("order-2", opened(), expected_version=1)
    error = caught.value
    assert (error.stream_id, error.current_version, error.expected_version) == ("order-2", 3, 1)
    assert error.sqlstate == "SM004"
    with pytest.raises(VersionConflict):
        await store.append("order-2", opened(), expected_version=ExpectedVersion.NO_STREAM)
    with pytest.raises(VersionConflict) as missing:
        await store.append("order-3", opened(), expected_version=ExpectedVersion.STREAM_EXISTS)
    assert missing.value.current_version == 0
    assert [e.version for e in await store.read_stream("order-2")] == [1, 2, 3]
    assert await store.stream_state("order-3") is None


async def test_idempotent_retry(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    batch = opened(2)
    original = await store.append("order-4", batch, expected_version=0)
    await store.append("order-4", opened(), expected_version=2)
    retried = await store.append("order-4", batch, expected_version=0)
    assert retried.duplicate is True
    assert (retried.from_version, retried.version) == (1, 2)
    assert (retried.first_position, retried.last_position) == (
        original.first_position,
        original.last_position,
    )
    assert len(await store.read_stream("order-4")) == 3

    changed = NewEvent(type="Opened", data={"n": 99}, event_id=batch[0].event_id)
    with pytest.raises(IdempotencyKeyReused):
        await store.append("order-4", [changed, batch[1]], expected_version=0)
    assert len(await store.read_stream("order-4")) == 3


async def test_racing_coroutines_one_wins(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store

    async def attempt(i: int) -> int | None:
        try:
            result = await store.append(
                "order-5", [NewEvent(type="Claimed", data={"by": i})], expected_version=0
            )
        except VersionConflict:
            return None
        return result.version

    outcomes = await asyncio.gather(*(attempt(i) for i in range(8)))
    assert [v for v in outcomes if v is not None] == [1]
    [stored] = await store.read_stream("order-5")
    assert outcomes[stored.data["by"]] == 1


async def test_read_all_pages(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    results = [
        await store.append(f"cart-{i % 4}", opened(5, kind))
        for i, kind in enumerate(["Added", "Paid", "Added", "Added", "Paid", "Added"])
    ]
    await store.wait_for(results[-1].last_position, timeout=60)

    seen: list[RecordedEvent] = []
    after: Position | str | None = None
    while page := await store.read_all(after=after, limit=7):
        assert page.last_position == page.events[-1].position
        seen.extend(page.events)
        after = str(page.last_position)
    assert len(seen) == 30
    assert [e.position for e in seen] == sorted({e.position for e in seen})
    assert seen[-1].position == results[-1].last_position

    paid = await store.read_all(types=["Paid"])
    assert len(paid) == 10 and {e.type for e in paid} == {"Paid"}
    category = await store.read_category("cart", after=seen[9].position, limit=100)
    assert [e.event_id for e in category] == [e.event_id for e in seen[10:]]
    empty = await store.read_all(after=results[-1].last_position)
    assert empty.events == [] and empty.last_position == results[-1].last_position


async def test_append_many(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    await store.append("acct-b", opened())
    with pytest.raises(VersionConflict) as caught:
        await store.append_many(
            [
                StreamAppend("acct-a", opened(), ExpectedVersion.NO_STREAM),
                StreamAppend("acct-b", opened(), 5),
            ]
        )
    assert caught.value.stream_id == "acct-b"
    assert await store.stream_state("acct-a") is None

    results = await store.append_many(
        [
            StreamAppend("acct-b", opened(), 1),
            StreamAppend("acct-a", opened(2), ExpectedVersion.NO_STREAM),
        ],
        conditions=[StreamCondition("acct-c", ExpectedVersion.NO_STREAM)],
    )
    assert [(r.stream_id, r.version) for r in results] == [("acct-b", 2), ("acct-a", 2)]
    assert results[0].last_position.tx == results[1].last_position.tx
    assert await store.stream_state("acct-c") is None

    await store.append("policy-1", opened())
    with pytest.raises(VersionConflict):
        await store.append_many(
            [StreamAppend("claim-1", opened())], conditions=[StreamCondition("policy-1", 2)]
        )
    assert await store.stream_state("claim-1") is None


async def test_stream_state_and_check_version(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    await store.append("invoice-1-x", opened(2))
    state = await store.stream_state("invoice-1-x")
    assert state is not None
    assert (state.tenant, state.stream_id, state.category, state.version) == (
        "default",
        "invoice-1-x",
        "invoice",
        2,
    )
    assert (state.state, state.machine, state.lease_epoch, state.archived) == (None, None, 0, False)
    assert await store.check_version("invoice-1-x", 2) == 2
    assert await store.check_version("invoice-9", ExpectedVersion.NO_STREAM) == 0
    with pytest.raises(VersionConflict):
        await store.check_version("invoice-1-x", ExpectedVersion.NO_STREAM)


async def test_bad_input_raises_before_io(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    with pytest.raises(InvalidInput):
        await store.append("", opened())
    with pytest.raises(InvalidInput):
        await store.append("order-6", [])
    with pytest.raises(InvalidInput):
        await store.read_all(limit=0)
    with pytest.raises(InvalidInput):
        await store.read_all(after="nope")
    assert await store.stream_state("order-6") is None


# --- inside the caller's transaction -----------------------------------------------------------


async def test_caller_connection_rollback_discards_append(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    async with store.engine.connect() as conn:
        result = await store.append("order-7", opened(2), expected_version=0, conn=conn)
        assert result.version == 2
        # Visible inside the caller's transaction, to the caller only.
        assert len(await store.read_stream("order-7", conn=conn)) == 2
        state = await store.stream_state("order-7", conn=conn)
        assert state is not None and state.version == 2
        assert await store.read_stream("order-7") == []
        await conn.rollback()
    assert await store.read_stream("order-7") == []
    assert await store.stream_state("order-7") is None
    # The rolled-back append burned positions but left no version behind.
    again = await store.append("order-7", opened(), expected_version=0)
    assert again.version == 1


async def test_caller_transaction_commits_domain_write_with_append(
    fresh_async_store: AsyncStore,
) -> None:
    store = fresh_async_store
    async with store.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE orders (id text PRIMARY KEY, total int)"))
    async with store.engine.begin() as conn:
        await store.append("order-8", opened(), expected_version=0, conn=conn)
        await conn.execute(text("INSERT INTO orders VALUES ('order-8', 42)"))
    async with store.engine.connect() as conn:
        total = (await conn.execute(text("SELECT total FROM orders"))).scalar_one()
    assert total == 42
    assert [e.version for e in await store.read_stream("order-8")] == [1]

    # A failing domain write takes the append down with it.
    with pytest.raises(IntegrityError):
        async with store.engine.begin() as conn:
            await store.append("order-9", opened(), conn=conn)
            await conn.execute(text("INSERT INTO orders VALUES ('order-8', 1)"))
    assert await store.stream_state("order-9") is None


async def test_rejection_in_a_savepoint_keeps_the_transaction(
    fresh_async_store: AsyncStore,
) -> None:
    store = fresh_async_store
    await store.append("order-10", opened())
    async with store.engine.connect() as conn:
        await store.append("order-11", opened(), conn=conn)
        with pytest.raises(VersionConflict):
            async with conn.begin_nested():
                await store.append("order-10", opened(), expected_version=0, conn=conn)
        await store.append("order-11", opened(), expected_version=1, conn=conn)
        await conn.commit()
    assert [e.version for e in await store.read_stream("order-11")] == [1, 2]
    assert [e.version for e in await store.read_stream("order-10")] == [1]


async def test_async_session(fresh_async_store: AsyncStore) -> None:
    store = fresh_async_store
    async with AsyncSession(store.engine) as session:
        await store.append("order-12", opened(), conn=session)
        assert len(await store.read_stream("order-12", conn=session)) == 1
        await session.rollback()
    assert await store.stream_state("order-12") is None
    async with AsyncSession(store.engine) as session:
        await store.append("order-12", opened(), conn=session)
        await session.commit()
    assert [e.version for e in await store.read_stream("order-12")] == [1]


async def test_psycopg_async_connection(fresh_async_store: AsyncStore, fresh_db: str) -> None:
    store = fresh_async_store
    async with await psycopg.AsyncConnection.connect(fresh_db) as raw:
        await store.append("order-13", opened(2), conn=raw)
        assert len(await store.read_stream("order-13", conn=raw)) == 2
        await raw.rollback()
        assert await store.read_stream("order-13", conn=raw) == []
        await store.append("order-13", opened(), expected_version=0, conn=raw)
        await raw.commit()
    assert [e.version for e in await store.read_stream("order-13")] == [1]
