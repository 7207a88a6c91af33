"""pgstate on a psycopg connection the caller configured and shares: its row factory and
JSON loads do not reach pgstate's results, its adapters are left alone, the cursor pgstate
keeps per connection is never shared by two threads, and a closed connection does not
leave a broken cursor behind."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from pgstate import AsyncStore, ExpectedVersion, NewEvent, StaleState, Store, VersionConflict
from pgstate._connect import libpq_dsn
from pgstate.errors import PgStateError
from pgstate.machine import Machine, State

XID8_OID = 5069


class Lamp(Machine):
    name = "CallerConnectionLamp"
    off = State(initial=True)
    on = State()

    switch_on = off.to(on)
    switch_off = on.to(off)


@pytest.fixture
def dict_conn(pgstate_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True, row_factory=dict_row) as c:
        yield c


def test_dict_row_connection_gets_typed_results(
    store: Store, dict_conn: psycopg.Connection[Any]
) -> None:
    store.register(Lamp)
    appended = store.append("caller-dict-1", [NewEvent(type="A", data={"n": 1})], conn=dict_conn)
    assert appended.version == 1
    store.create("caller-lamp-1", Lamp, conn=dict_conn)
    result = store.transition("caller-lamp-1", "switch_on", conn=dict_conn)
    assert (result.from_state, result.to_state, result.version) == ("off", "on", 2)
    with pytest.raises(StaleState) as refused:
        store.transition("caller-lamp-1", "switch_on", expected_state="off", conn=dict_conn)
    assert refused.value.current_state == "on" and refused.value.current_version == 2
    events = store.read_stream("caller-dict-1", conn=dict_conn)
    assert [(e.version, e.data) for e in events] == [(1, {"n": 1})]
    # The caller's own queries keep the caller's row factory.
    row = dict_conn.execute("SELECT 1 AS one").fetchone()
    assert row == {"one": 1}


def test_caller_json_loads_and_adapters_left_alone(store: Store, pgstate_db: str) -> None:
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as conn:
        calls: list[str | bytes] = []

        def counting_loads(data: str | bytes) -> Any:
            calls.append(data)
            return json.loads(data)

        set_json_loads(counting_loads, conn)
        store.register(Lamp)
        store.create("caller-lamp-2", Lamp, conn=conn)
        with pytest.raises(StaleState) as refused:
            # The refusal's detail is jsonb, read with pgstate's loads, not the caller's.
            store.transition("caller-lamp-2", "switch_on", expected_state="on", conn=conn)
        assert refused.value.current_state == "off"
        assert calls == []
        assert conn.execute("SELECT '{\"k\": 1}'::jsonb").fetchone() == ({"k": 1},)
        assert len(calls) == 1
        assert conn.adapters.get_loader(XID8_OID, Format.BINARY) is None


def test_callers_own_xid8_loader_does_not_reach_positions(store: Store, pgstate_db: str) -> None:
    class Xid8AsText(Loader):
        def load(self, data: Buffer) -> str:
            return "xid:" + bytes(data).hex()

    class Xid8BinaryAsText(Xid8AsText):
        format = Format.BINARY

    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as conn:
        conn.adapters.register_loader(XID8_OID, Xid8AsText)
        conn.adapters.register_loader(XID8_OID, Xid8BinaryAsText)
        store.append("caller-xid-1", [NewEvent(type="A", data={})], conn=conn)
        (event,) = store.read_stream("caller-xid-1", conn=conn)
        assert type(event.position.tx) is int and event.position.tx > 0
        # The caller's own queries still get the caller's loader.
        row = conn.execute("SELECT pg_current_xact_id()").fetchone()
        assert row is not None and str(row[0]).startswith("xid:")


def test_integers_beyond_64_bits_read_back_exact(store: Store, pgstate_db: str) -> None:
    big = {"above_u64": 2**64, "below_i64": -(2**63) - 1, "huge": 10**40, "u64": 2**64 - 1}
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as conn:
        store.register(Lamp)
        store.create("caller-lamp-3", Lamp, data=big, conn=conn)
        store.append("caller-big-1", [NewEvent(type="Big", data=big)], conn=conn)
        (event,) = store.read_stream("caller-big-1", conn=conn)
        assert event.data == big
        assert all(type(value) is int for value in event.data.values())
        created = store.read_stream("caller-lamp-3", conn=conn)
        assert created[0].data == big


def test_threads_sharing_a_connection_each_store_their_writes(
    store: Store, pgstate_db: str
) -> None:
    threads, per_thread = 4, 50
    errors: list[BaseException] = []
    versions: dict[int, list[int]] = {}
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as conn:

        def work(number: int) -> None:
            try:
                mine = versions.setdefault(number, [])
                for index in range(per_thread):
                    result = store.append(
                        f"caller-thread-{number}",
                        [NewEvent(type="T", data={"thread": number, "i": index})],
                        expected_version=index,
                        conn=conn,
                    )
                    mine.append(result.version)
            except BaseException as error:  # reported below, with the thread's number
                errors.append(error)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        for number in range(threads):
            # Each thread saw its own results: a cursor shared between threads would hand
            # one thread another's row.
            assert versions[number] == list(range(1, per_thread + 1))
            stored = store.read_stream(f"caller-thread-{number}", conn=conn)
            assert [e.data for e in stored] == [
                {"thread": number, "i": index} for index in range(per_thread)
            ]


def test_closed_connection_then_a_new_one(store: Store, pgstate_db: str) -> None:
    conn = psycopg.connect(libpq_dsn(pgstate_db), autocommit=True)
    store.append("caller-closed-1", [NewEvent(type="A", data={})], conn=conn)
    conn.close()
    with pytest.raises(Exception) as closed:
        store.append("caller-closed-1", [NewEvent(type="A", data={})], conn=conn)
    assert "closed" in str(closed.value)
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as fresh:
        result = store.append("caller-closed-1", [NewEvent(type="A", data={})], conn=fresh)
        assert result.version == 2


async def test_async_tasks_sharing_a_connection(pgstate_db: str) -> None:
    store = AsyncStore(pgstate_db)
    try:
        async with await psycopg.AsyncConnection.connect(
            libpq_dsn(pgstate_db), autocommit=True, row_factory=dict_row
        ) as conn:

            async def work(number: int) -> list[int]:
                return [
                    (
                        await store.append(
                            f"caller-task-{number}",
                            [NewEvent(type="T", data={"i": index})],
                            expected_version=index,
                            conn=conn,
                        )
                    ).version
                    for index in range(20)
                ]

            results = await asyncio.gather(*(work(n) for n in range(4)))
            assert results == [list(range(1, 21))] * 4
            events = await store.read_stream("caller-task-3", conn=conn)
            assert [e.data["i"] for e in events] == list(range(20))
    finally:
        await store.close()


def test_kept_cursor_after_an_aborted_transaction(store: Store, pgstate_db: str) -> None:
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:  # not autocommit: the caller's tx
        store.append("caller-abort-1", [NewEvent(type="A", data={})], conn=conn)
        conn.commit()
        with pytest.raises(VersionConflict):
            store.append(
                "caller-abort-1",
                [NewEvent(type="B", data={})],
                expected_version=ExpectedVersion.NO_STREAM,
                conn=conn,
            )
        # Whatever the refusal did to the caller's transaction, a rollback recovers it and
        # the same connection (and pgstate's cursor on it) carries on.
        conn.rollback()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(PgStateError) as aborted:  # the caller's transaction is aborted
            store.append("caller-abort-1", [NewEvent(type="C", data={})], conn=conn)
        assert aborted.value.sqlstate == "25P02"
        conn.rollback()
        result = store.append("caller-abort-1", [NewEvent(type="D", data={})], conn=conn)
        conn.commit()
        assert result.version == 2
        assert [e.type for e in store.read_stream("caller-abort-1", conn=conn)] == ["A", "D"]


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_snapshot_older_than_the_stream_is_a_retryable_serialization_failure(
    store: Store, pgstate_db: str, isolation: str
) -> None:
    """A caller's REPEATABLE READ or SERIALIZABLE transaction that took its snapshot before
    another writer committed to the stream cannot write that stream: the refusal is a
    SerializationFailure (retry the whole transaction), not a VersionConflict, which an
    append at ExpectedVersion.ANY could never get. The retry then succeeds."""
    from pgstate import SerializationFailure

    stream = f"snapshot-{isolation.split()[0].lower()}"
    lamp = f"{stream}-lamp"
    store.register(Lamp)
    store.append(stream, [NewEvent(type="Opened")])
    store.create(lamp, Lamp)

    def snapshot_then(moved_meanwhile: Callable[[], object]) -> psycopg.Connection[Any]:
        conn = psycopg.connect(libpq_dsn(pgstate_db))
        conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        conn.execute("SELECT 1")  # takes the snapshot
        moved_meanwhile()
        return conn

    with snapshot_then(lambda: store.append(stream, [NewEvent(type="Moved")])) as conn:
        with pytest.raises(SerializationFailure) as caught:
            store.append(stream, [NewEvent(type="Late")], conn=conn)
        assert caught.value.retryable is True

    def on_and_off() -> None:  # back to the state the snapshot sees, two versions on
        store.transition(lamp, "switch_on")
        store.transition(lamp, "switch_off")

    with snapshot_then(on_and_off) as conn, pytest.raises(SerializationFailure):
        store.transition(lamp, "switch_on", conn=conn)
    with snapshot_then(lambda: None) as conn:  # the retries, on fresh snapshots
        result = store.append(stream, [NewEvent(type="Late")], conn=conn)
        moved = store.transition(lamp, "switch_on", conn=conn)
        conn.commit()
    assert (result.version, moved.version) == (3, 4)
    assert [event.type for event in store.read_stream(stream)] == ["Opened", "Moved", "Late"]


def test_tasks_sharing_a_connection_take_turns(store: Store, pgstate_db: str) -> None:
    """Concurrent calls on one AsyncConnection run one at a time: with inline projections
    (a savepoint per call), one task's refusal no longer rolls back the writes the others
    were told had succeeded."""
    from pgstate.models import RecordedEvent
    from pgstate.projection import AsyncInlineProjection

    class Noted(AsyncInlineProjection):
        async def apply(self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent) -> None:
            await asyncio.sleep(0)  # a turn for the other tasks, mid-call

    stream = "shared-conn"
    store.append(stream, [NewEvent(type="Opened")])

    async def scenario() -> list[str]:
        astore = AsyncStore(pgstate_db, inline_projections=[Noted()])
        conn = await psycopg.AsyncConnection.connect(libpq_dsn(pgstate_db))

        async def append(expected: int) -> str:
            try:
                await astore.append(
                    stream, [NewEvent(type="Noted")], expected_version=expected, conn=conn
                )
            except VersionConflict:
                return "conflict"
            return "ok"

        try:
            outcomes = await asyncio.gather(
                append(5), append(ExpectedVersion.ANY), append(ExpectedVersion.ANY)
            )
            await conn.commit()
        finally:
            await conn.close()
            await astore.close()
        return list(outcomes)

    outcomes = asyncio.run(scenario())
    assert sorted(outcomes) == ["conflict", "ok", "ok"]
    assert [e.type for e in store.read_stream(stream)] == ["Opened", "Noted", "Noted"]


def test_threads_sharing_an_autocommit_connection_take_turns(store: Store, pgstate_db: str) -> None:
    """append_many runs in a transaction block on an autocommit connection; two threads
    at once nested their blocks and closed them in the wrong order."""
    from pgstate import StreamAppend

    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as shared:

        def write(n: int) -> None:
            store.append_many(
                [StreamAppend(f"turns-{n}-{k}", [NewEvent(type="Noted")]) for k in range(2)],
                conn=shared,
            )

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert shared.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    for n in range(4):
        for k in range(2):
            assert len(store.read_stream(f"turns-{n}-{k}")) == 1
