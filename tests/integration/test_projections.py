"""Inline projections, the async projection worker (exactly-once checkpoints, fencing,
parking, consumer groups, rebuild), read-your-writes and snapshots."""

from __future__ import annotations

import asyncio
import enum
import logging
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from pgstate import LeaseHeld, LeaseLost, NewEvent, PositionNotInLog, Store
from pgstate._connect import libpq_dsn
from pgstate.fold import Fold
from pgstate.models import Position, RecordedEvent
from pgstate.projection import (
    AsyncInlineProjection,
    InlineProjection,
    Projection,
    ProjectionWorker,
    SwallowedDatabaseError,
    rebuild,
    wait_for_projection,
)

pytestmark = pytest.mark.committing


class Totals(InlineProjection):
    name = "totals"
    types = ("Added",)

    def apply(self, conn: psycopg.Connection[Any], event: RecordedEvent) -> None:
        conn.execute(
            "INSERT INTO totals (stream_id, total) VALUES (%s, %s) "
            "ON CONFLICT (stream_id) DO UPDATE SET total = totals.total + excluded.total",
            (event.stream_id, event.data["n"]),
        )


class Failing(InlineProjection):
    def apply(self, conn: psycopg.Connection[Any], event: RecordedEvent) -> None:
        raise RuntimeError("read model unavailable")


def added(n: int) -> NewEvent:
    return NewEvent(type="Added", data={"n": n})


def create_totals(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE totals (stream_id text PRIMARY KEY, total int)"))


def total(store: Store, stream_id: str) -> int | None:
    with store.engine.connect() as conn:
        value = conn.execute(
            text("SELECT total FROM totals WHERE stream_id = :s"), {"s": stream_id}
        ).scalar_one_or_none()
        return None if value is None else int(value)


def test_inline_projection_commits_with_the_append(fresh_db: str) -> None:
    store = Store(fresh_db, inline_projections=[Totals()])
    create_totals(store)
    store.append("cart-1", [added(2), added(3), NewEvent(type="Viewed")])
    assert total(store, "cart-1") == 5
    with store.engine.connect() as conn:
        store.append("cart-1", [added(10)], conn=conn)
        conn.rollback()
    assert total(store, "cart-1") == 5
    assert len(store.read_stream("cart-1")) == 3
    # An idempotent retry stores nothing and projects nothing.
    event = added(7)
    store.append("cart-2", [event])
    store.append("cart-2", [event])
    assert total(store, "cart-2") == 7
    store.close()


def test_failing_inline_projection_stores_nothing(fresh_db: str) -> None:
    store = Store(fresh_db, inline_projections=[Failing()])
    with pytest.raises(RuntimeError):
        store.append("cart-3", [added(1)])
    assert store.stream_state("cart-3") is None
    store.close()


def test_a_failing_inline_projection_in_the_callers_transaction_takes_its_events_along(
    fresh_db: str,
) -> None:
    """Inside the caller's transaction the write runs under a savepoint: the caller who
    catches the projection's error and commits commits nothing of the failed write, and
    keeps what it wrote before. Both with SQLAlchemy (whose transaction has sent nothing
    yet when the append comes first) and with psycopg."""
    store = Store(fresh_db, inline_projections=[Failing()])
    with store.engine.connect() as conn:
        with pytest.raises(RuntimeError):
            store.append("cart-4", [added(1)], conn=conn)
        conn.commit()
    with psycopg.connect(libpq_dsn(fresh_db)) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        with pytest.raises(RuntimeError):
            store.append("cart-4", [added(2)], conn=conn)
        conn.execute("INSERT INTO kept VALUES (1)")
        conn.commit()
    assert store.stream_state("cart-4") is None
    with psycopg.connect(libpq_dsn(fresh_db)) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    store.close()


def test_a_projected_write_in_the_callers_transaction_rolls_back_with_it(fresh_db: str) -> None:
    """The savepoint joins the caller's transaction, never commits on its own."""
    store = Store(fresh_db, inline_projections=[Totals()])
    create_totals(store)
    with store.engine.connect() as conn:
        store.append("cart-6", [added(3)], conn=conn)
        store.append("cart-6", [added(4)], conn=conn)
        conn.rollback()
    with psycopg.connect(libpq_dsn(fresh_db)) as conn:
        store.append("cart-6", [added(5)], conn=conn)
        conn.rollback()
    assert store.stream_state("cart-6") is None and total(store, "cart-6") is None
    with store.engine.begin() as conn:
        store.append("cart-6", [added(6)], conn=conn)
    assert total(store, "cart-6") == 6
    store.close()


class Counting(Projection):
    """Counts events per stream and records the last version seen, checking order."""

    name = "counting"
    table = "event_counts"

    def __init__(self, poison: set[int] | None = None) -> None:
        self.poison = poison or set()

    async def setup(self, conn: psycopg.AsyncConnection[Any], table: str) -> None:
        await conn.execute(
            psycopg.sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (stream_id text PRIMARY KEY, seen int, last int)"
            ).format(psycopg.sql.Identifier(table))
        )

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        if event.data.get("n") in self.poison:
            raise ValueError(f"cannot handle {event.data}")
        await conn.execute(
            psycopg.sql.SQL(
                "INSERT INTO {t} (stream_id, seen, last) VALUES (%s, 1, %s) "
                "ON CONFLICT (stream_id) DO UPDATE SET seen = {t}.seen + 1, last = excluded.last"
            ).format(t=psycopg.sql.Identifier(table)),
            (event.stream_id, event.version),
        )


def counts(dsn: str, table: str = "event_counts") -> dict[str, tuple[int, int]]:
    with psycopg.connect(libpq_dsn(dsn)) as conn:
        rows = conn.execute(
            psycopg.sql.SQL("SELECT stream_id, seen, last FROM {}").format(
                psycopg.sql.Identifier(table)
            )
        ).fetchall()
    return {stream: (seen, last) for stream, seen, last in rows}


async def drain(worker: ProjectionWorker) -> None:
    for _ in range(1000):
        if await worker.run_once() == 0:
            return
    raise AssertionError("worker did not drain")


def test_worker_exactly_once_parking_and_retry(
    fresh_store: Store, fresh_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    for stream in ("acct-1", "acct-2"):
        fresh_store.append(stream, [NewEvent(type="Added", data={"n": n}) for n in range(5)])
    projection = Counting(poison={3})
    worker = ProjectionWorker(fresh_db, projection, page_size=3, max_attempts=2)

    async def scenario() -> None:
        await drain(worker)
        await drain(worker)  # nothing new: no double counting
        parked = await worker.parked_events()
        assert len(parked) == 2 and all("cannot handle" in row[4] for row in parked)
        assert counts(fresh_db) == {"acct-1": (4, 5), "acct-2": (4, 5)}
        with caplog.at_level(logging.WARNING, logger="pgstate.projection"):
            assert await worker.retry_parked() == 0  # still poisoned: both stay parked
        assert len(await worker.parked_events()) == 2
        assert [r.getMessage().count("failed again") for r in caplog.records] == [1, 1]
        projection.poison.clear()
        assert await worker.retry_parked() == 2
        assert await worker.parked_events() == []
        assert counts(fresh_db) == {"acct-1": (5, 4), "acct-2": (5, 4)}
        last = fresh_store.append("acct-1", [added(9)])
        await drain(worker)
        await wait_for_projection(fresh_db, "counting", last.last_position, timeout=5)
        assert counts(fresh_db)["acct-1"] == (6, 6)
        await worker.close()

    asyncio.run(scenario())


class Gated(Counting):
    """Counting that, inside its first retried apply, says it got there and then holds its
    transaction open until another backend waits on a lock."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.inside = asyncio.Event()

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        await super().apply(conn, event, table)
        self.inside.set()
        async with await psycopg.AsyncConnection.connect(
            libpq_dsn(self.dsn), autocommit=True
        ) as watcher:
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                waiting = await watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                row = await waiting.fetchone()
                if row is not None and row[0] > 0:
                    return
                assert asyncio.get_running_loop().time() < deadline, "no retry waited"
                await asyncio.sleep(0.01)


def test_two_retries_at_once_apply_a_parked_event_once(fresh_store: Store, fresh_db: str) -> None:
    fresh_store.append("acct-1", [added(n) for n in range(5)])
    parker = ProjectionWorker(fresh_db, Counting(poison={3}), max_attempts=1)
    gated = Gated(fresh_db)
    first = ProjectionWorker(fresh_db, gated, owner="first")
    second = ProjectionWorker(fresh_db, Counting(), owner="second")

    async def scenario() -> tuple[int, int]:
        await drain(parker)
        await parker.close()
        assert len(await first.parked_events()) == 1
        first_retry = asyncio.create_task(first.retry_parked())
        await asyncio.wait_for(gated.inside.wait(), timeout=10)
        # The first retry is inside its transaction; the second runs into it.
        applied_by_second = await second.retry_parked()
        applied_by_first = await first_retry
        assert await second.parked_events() == []
        await first.close()
        await second.close()
        return applied_by_first, applied_by_second

    assert asyncio.run(scenario()) == (1, 0)
    assert counts(fresh_db) == {"acct-1": (5, 4)}  # the retried event counted once


def test_stale_worker_is_fenced(fresh_store: Store, fresh_db: str) -> None:
    fresh_store.append("acct-9", [added(1)])
    first = ProjectionWorker(
        fresh_db, Counting(), owner="w1", lease_ttl=timedelta(milliseconds=200)
    )
    second = ProjectionWorker(fresh_db, Counting(), owner="w2")

    async def scenario() -> None:
        assert await first.claim()
        assert not await second.claim()  # one active worker per projection
        # The first worker "hangs"; the second takes over once the first lease lapses.
        deadline = asyncio.get_running_loop().time() + 5
        while not await second.claim():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        assert second.epoch == (first.epoch or 0) + 1
        fresh_store.append("acct-9", [added(2)])
        with pytest.raises(LeaseLost):
            await first.run_once()
        assert counts(fresh_db) == {}  # nothing of the fenced page was committed
        await drain(second)
        assert counts(fresh_db) == {"acct-9": (2, 2)}
        await first.close()
        await second.close()

    asyncio.run(scenario())


def twenty_streams_of_three(store: Store) -> list[str]:
    streams = [f"acct-{n}" for n in range(20)]
    for stream in streams:
        store.append(stream, [added(n) for n in range(3)])
    return streams


def group_of_two(dsn: str, owner: str) -> list[ProjectionWorker]:
    return [
        ProjectionWorker(dsn, Counting(), member=m, members=2, owner=f"{owner}{m}")
        for m in range(2)
    ]


def test_consumer_group_splits_streams(fresh_store: Store, fresh_db: str) -> None:
    streams = twenty_streams_of_three(fresh_store)
    members = group_of_two(fresh_db, "m")

    async def scenario() -> None:
        for worker in members:
            await drain(worker)
        handled = [worker.handled for worker in members]
        assert sum(handled) == 60 and all(h > 0 for h in handled)
        for worker in members:
            await worker.close()

    asyncio.run(scenario())
    assert counts(fresh_db) == {stream: (3, 3) for stream in streams}


def test_rebuild_swaps_in_a_fresh_table(fresh_store: Store, fresh_db: str) -> None:
    for stream in ("acct-a", "acct-b"):
        fresh_store.append(stream, [added(n) for n in range(4)])
    worker = ProjectionWorker(fresh_db, Counting())
    progress: list[tuple[int, int]] = []

    async def scenario() -> Position:
        await drain(worker)
        await worker.release()
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            conn.execute("UPDATE event_counts SET seen = 999")  # a corrupted read model
        position = await rebuild(
            fresh_db, Counting(), progress=lambda done, total: progress.append((done, total))
        )
        fresh_store.append("acct-a", [added(7)])
        await drain(worker)
        await worker.close()
        return position

    position = asyncio.run(scenario())
    assert counts(fresh_db) == {"acct-a": (5, 5), "acct-b": (4, 4)}
    assert progress and progress[-1][0] == 8
    assert position.pos > 0


def test_rebuild_of_a_consumer_group_fences_every_member(fresh_store: Store, fresh_db: str) -> None:
    streams = twenty_streams_of_three(fresh_store)
    live = group_of_two(fresh_db, "m")

    async def scenario() -> Position:
        for worker in live:
            await drain(worker)
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            conn.execute("UPDATE event_counts SET seen = 999")  # a corrupted read model
        position = await rebuild(fresh_db, Counting())
        for stream in streams:
            fresh_store.append(stream, [added(9)])
        # Both members still believe they hold their lease; both are fenced.
        for worker in live:
            with pytest.raises(LeaseLost):
                await worker.run_once()
            await worker.close()
        assert counts(fresh_db) == {stream: (3, 3) for stream in streams}
        # Restarted members go on from the rebuilt table's position, each stream once.
        restarted = group_of_two(fresh_db, "r")
        for worker in restarted:
            await drain(worker)
            await worker.close()
        return position

    position = asyncio.run(scenario())
    assert counts(fresh_db) == {stream: (4, 4) for stream in streams}
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        members = conn.execute(
            "SELECT member, members FROM pgstate.checkpoints WHERE projection = 'counting'"
            " ORDER BY member"
        ).fetchall()
    assert members == [(0, 2), (1, 2)]
    assert position.pos > 0


def test_store_wait_for(fresh_store: Store) -> None:
    result = fresh_store.append("note-1", [added(1)])
    fresh_store.wait_for(result.last_position, timeout=5)
    page = fresh_store.read_all()
    assert page.last_position == result.last_position


class Sum(Fold):
    name = "sum"
    snapshot_every = 100

    def initial(self) -> dict[str, Any]:
        return {"total": 0, "count": 0}

    def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        return {"total": state["total"] + event.data["n"], "count": state["count"] + 1}


def test_load_state_with_snapshots(fresh_store: Store) -> None:
    fresh_store.append("ledger-1", [added(n) for n in range(250)])
    first = fresh_store.load_state("ledger-1", Sum())
    assert first.state == {"total": sum(range(250)), "count": 250}
    assert (first.snapshot_version, first.events_folded) == (None, 250)
    fresh_store.append("ledger-1", [added(1000)])
    second = fresh_store.load_state("ledger-1", Sum())
    assert second.state == {"total": sum(range(250)) + 1000, "count": 251}
    assert (second.snapshot_version, second.events_folded, second.version) == (250, 1, 251)
    plain = fresh_store.load_state("ledger-1", Sum(), use_snapshot=False)
    assert plain.state == second.state and plain.events_folded == 251

    class Doubled(Sum):
        def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
            return {"total": state["total"] + 2 * event.data["n"], "count": state["count"] + 1}

    assert Doubled().fold_hash() != Sum().fold_hash()
    doubled = fresh_store.load_state("ledger-1", Doubled())
    assert doubled.snapshot_version is None
    assert doubled.state["total"] == 2 * (sum(range(250)) + 1000)


class ByVersion(Fold):
    """A state keyed by int: JSON would turn the keys into strings."""

    name = "by_version"
    snapshot_every = 2

    def initial(self) -> dict[str, Any]:
        return {}

    def apply(self, state: dict[Any, Any], event: RecordedEvent) -> dict[Any, Any]:
        return {**state, event.version: event.type}


class WithTimes(Fold):
    name = "with_times"
    snapshot_every = 2

    def initial(self) -> dict[str, Any]:
        return {"seen": []}

    def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        return {"seen": [*state["seen"], event.recorded_at]}


class Level(enum.IntEnum):
    LOW = 1


class WithEnum(Fold):
    """An IntEnum compares equal to its int, and JSON gives the int back: not the state."""

    name = "with_enum"
    snapshot_every = 2

    def initial(self) -> dict[str, Any]:
        return {"level": Level.LOW}

    def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        return state


@pytest.mark.parametrize(
    "fold", [ByVersion(), WithTimes(), WithEnum()], ids=["int-keys", "datetimes", "int-enum"]
)
def test_a_state_json_would_change_is_refused_a_snapshot(fresh_store: Store, fold: Fold) -> None:
    from pgstate import InvalidInput

    fresh_store.append("ledger-2", [added(1), added(2)])
    folded = fresh_store.load_state("ledger-2", fold, use_snapshot=False)
    with pytest.raises(InvalidInput) as refused:
        fresh_store.load_state("ledger-2", fold)
    assert refused.value.detail["field"] == "state"
    with fresh_store.engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM pgstate.snapshots")).scalar_one()
    assert stored == 0  # nothing saved that a later load would read back changed
    assert fresh_store.load_state("ledger-2", fold, use_snapshot=False) == folded


def test_group_size_is_one_per_projection(fresh_store: Store, fresh_db: str) -> None:
    from pgstate import InvalidInput

    async def scenario() -> None:
        first = ProjectionWorker(fresh_db, Counting(), member=0, members=2)
        other = ProjectionWorker(fresh_db, Counting(), member=2, members=3)
        assert await first.claim()
        with pytest.raises(InvalidInput):
            await other.claim()
        await first.close()
        await other.close()

    asyncio.run(scenario())


def test_two_workers_in_one_process_do_not_share_a_lease(fresh_store: Store, fresh_db: str) -> None:
    async def scenario() -> None:
        first, second = (
            ProjectionWorker(fresh_db, Counting()),
            ProjectionWorker(fresh_db, Counting()),
        )
        assert first.owner != second.owner
        assert await first.claim()
        assert not await second.claim()
        await first.close()
        await second.close()

    asyncio.run(scenario())


def test_idle_worker_keeps_its_lease(fresh_store: Store, fresh_db: str) -> None:
    fresh_store.append("acct-1", [added(1)])
    ttl = timedelta(milliseconds=300)
    active = ProjectionWorker(fresh_db, Counting(), lease_ttl=ttl, poll_interval=0.02)
    standby = ProjectionWorker(fresh_db, Counting(), lease_ttl=ttl)
    stop = asyncio.Event()

    async def scenario() -> None:
        task = asyncio.create_task(active.run(stop.is_set))
        await wait_for_projection(fresh_db, "counting", Position(0, 1), timeout=5)
        # Idle for several lease lengths: the active worker renews, the standby waits.
        for _ in range(10):
            assert not await standby.claim()
            await asyncio.sleep(0.1)
        stop.set()
        await task
        await active.close()
        await standby.close()

    asyncio.run(scenario())


class SlowCounting(Counting):
    """Sleeps inside the live table's page transaction, as a slow handler would."""

    slow = False

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        await super().apply(conn, event, table)
        if self.slow and table == self.table:
            await asyncio.sleep(0.5)


def test_rebuild_fences_a_live_worker_without_deadlock(fresh_store: Store, fresh_db: str) -> None:
    fresh_store.append("acct-1", [added(1)])
    live_projection = SlowCounting()
    live = ProjectionWorker(fresh_db, live_projection, poll_interval=0.02)

    async def scenario() -> None:
        await drain(live)
        fresh_store.append("acct-2", [added(2)])
        live_projection.slow = True
        page = asyncio.create_task(live.run_once())
        await asyncio.sleep(0.1)  # the live worker is inside its page transaction
        await rebuild(fresh_db, Counting())
        outcome = await asyncio.gather(page, return_exceptions=True)
        # Either the live page committed first (and the rebuild includes it), or it was
        # fenced by the rebuild's new epoch: never a deadlock.
        assert outcome[0] == 1 or isinstance(outcome[0], LeaseLost), outcome
        live_projection.slow = False
        stop = asyncio.Event()
        runner = asyncio.create_task(live.run(stop.is_set))
        last = fresh_store.append("acct-3", [added(3)])
        await wait_for_projection(fresh_db, "counting", last.last_position, timeout=10)
        stop.set()
        await runner
        await live.close()

    asyncio.run(scenario())
    assert counts(fresh_db) == {"acct-1": (1, 1), "acct-2": (1, 1), "acct-3": (1, 1)}


class AsyncTotals(AsyncInlineProjection):
    types = ("Added",)

    async def apply(self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent) -> None:
        await conn.execute(
            "INSERT INTO totals (stream_id, total) VALUES (%s, %s) "
            "ON CONFLICT (stream_id) DO UPDATE SET total = totals.total + excluded.total",
            (event.stream_id, event.data["n"]),
        )


class AsyncFailing(AsyncInlineProjection):
    async def apply(self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent) -> None:
        raise RuntimeError("read model unavailable")


def test_async_store_inline_projection_wait_for_and_snapshots(fresh_db: str) -> None:
    from pgstate import AsyncStore

    with Store(fresh_db) as sync_store:
        create_totals(sync_store)

    async def scenario() -> None:
        async with AsyncStore(fresh_db, inline_projections=[AsyncTotals()]) as astore:
            result = await astore.append("cart-9", [added(4), added(5)])
            await astore.wait_for(result.last_position, timeout=5)
            page = await astore.read_all()
            assert [e.version for e in page.events] == [1, 2]
            folded = await astore.load_state("cart-9", Sum())
            assert folded.state == {"total": 9, "count": 2}
            async with astore.engine.connect() as conn:
                await astore.append("cart-9", [added(100)], conn=conn)
                await conn.rollback()
        async with AsyncStore(fresh_db, inline_projections=[AsyncFailing()]) as failing:
            async with failing.engine.connect() as conn:
                with pytest.raises(RuntimeError):
                    await failing.append("cart-10", [added(1)], conn=conn)
                await conn.commit()
            assert await failing.stream_state("cart-10") is None

    asyncio.run(scenario())
    with Store(fresh_db) as sync_store:
        assert total(sync_store, "cart-9") == 9


class Slow(Counting):
    """Counting that takes ``pause`` seconds per event, as a handler calling out would."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        await asyncio.sleep(self.pause)
        await super().apply(conn, event, table)


class Held(Counting):
    """Counting that, at its first event, says so and waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.go_on = asyncio.Event()

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        self.started.set()
        await self.go_on.wait()
        await super().apply(conn, event, table)


def test_a_page_that_outlasts_the_lease_still_commits(fresh_store: Store, fresh_db: str) -> None:
    """The fence holds the checkpoint row for the whole page, so nobody can take the
    projection over meanwhile: a page longer than the lease commits instead of being
    rolled back (and re-run) forever."""
    fresh_store.append("acct-slow", [added(n) for n in range(8)])
    worker = ProjectionWorker(
        fresh_db, Slow(0.15), lease_ttl=timedelta(milliseconds=500), page_size=8
    )

    async def scenario() -> int:
        moved = await worker.run_once()
        await worker.close()
        return moved

    assert asyncio.run(scenario()) == 8
    assert counts(fresh_db) == {"acct-slow": (8, 8)}


class SwallowsItsError(Counting):
    """Catches the error of its own statement for one event and returns, as code that
    ignores a unique violation would."""

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        if event.data.get("n") == 2:
            try:
                await conn.execute("SELECT 1 / 0")
            except psycopg.Error:
                return
        await super().apply(conn, event, table)


def test_a_projection_that_swallows_its_database_error_is_parked_not_fatal(
    fresh_store: Store, fresh_db: str
) -> None:
    fresh_store.append("acct-s", [added(n) for n in range(5)])
    worker = ProjectionWorker(fresh_db, SwallowsItsError(), max_attempts=2)

    async def scenario() -> list[tuple[Any, ...]]:
        await drain(worker)
        parked = await worker.parked_events()
        await worker.close()
        return parked

    parked = asyncio.run(scenario())
    assert [(row[3], row[4]) for row in parked] == [
        (3, "SwallowedDatabaseError: the projection caught a database error and returned")
    ]
    assert counts(fresh_db) == {"acct-s": (4, 5)}


def test_two_rebuilds_at_once_one_is_refused(fresh_store: Store, fresh_db: str) -> None:
    fresh_store.append("acct-r", [added(n) for n in range(20)])

    async def scenario() -> list[Position | BaseException]:
        held = Held()
        first = asyncio.create_task(rebuild(fresh_db, held))
        await held.started.wait()  # the first holds the rebuild lock: it is copying
        second = await asyncio.gather(rebuild(fresh_db, Counting()), return_exceptions=True)
        held.go_on.set()
        return [await first, *second]

    first, second = asyncio.run(scenario())
    assert isinstance(first, Position)
    assert isinstance(second, LeaseHeld) and "another rebuild" in str(second)
    assert counts(fresh_db) == {"acct-r": (20, 20)}


def test_a_rebuild_takes_the_events_it_covers_off_the_parked_list(
    fresh_store: Store, fresh_db: str
) -> None:
    fresh_store.append("acct-p", [added(n) for n in range(4)])
    projection = Counting(poison={1})
    worker = ProjectionWorker(fresh_db, projection, max_attempts=1)

    async def scenario() -> None:
        await drain(worker)
        assert len(await worker.parked_events()) == 1
        await worker.release()
        projection.poison.clear()  # the handler is fixed, then the table rebuilt
        await rebuild(fresh_db, projection)
        assert await worker.parked_events() == []
        assert await worker.retry_parked() == 0
        await worker.close()

    asyncio.run(scenario())
    assert counts(fresh_db) == {"acct-p": (4, 4)}


def test_notifications_are_not_kept_while_the_worker_is_busy(
    fresh_store: Store, fresh_db: str
) -> None:
    """In commit mode every write notifies; the ones that arrive while a page is applied
    are dropped after it (the page covers them), not queued for as long as it is busy."""
    from pgstate.listen import set_notify_mode

    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        set_notify_mode(conn, "commit")
    worker = ProjectionWorker(fresh_db, Counting(), page_size=5)

    async def scenario() -> tuple[int, int]:
        assert await worker.claim()
        for n in range(30):
            fresh_store.append(f"acct-n{n % 3}", [added(n)])
        assert await worker.run_once() == 5
        conn = await worker._connection()
        await conn.execute("SELECT 1")  # reads what the server sent meanwhile
        backlog = conn._notifies_backlog  # psycopg's queue for notifies() (internal)
        queued = len(backlog) if backlog is not None else 0
        await worker.drain_notifications()
        left = len(backlog) if backlog is not None else 0
        await worker.close()
        return queued, left

    queued, left = asyncio.run(scenario())
    assert queued > 0 and left == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("page_size", 0),
        ("page_size", -1),
        ("page_size", 100_001),
        ("page_size", True),
        ("max_attempts", 0),
        ("max_attempts", 1.5),
        ("poll_interval", 0),
        ("poll_interval", -1),
        ("poll_interval", float("nan")),
        ("poll_interval", "1"),
    ],
)
def test_bad_worker_settings_are_invalid_input(fresh_db: str, setting: str, value: Any) -> None:
    from pgstate import InvalidInput

    with pytest.raises(InvalidInput) as caught:
        ProjectionWorker(fresh_db, Counting(), **{setting: value})
    assert caught.value.detail["field"] == setting


def test_a_rebuild_whose_projection_swallows_a_database_error_fails(
    fresh_store: Store, fresh_db: str
) -> None:
    """The rebuild's pages have no savepoint per event: a caught error would make their
    commit a silent rollback while the rebuild moved on. It fails instead, and the live
    table and the parked list stay as they were."""
    fresh_store.append("acct-w", [added(n) for n in range(4)])
    worker = ProjectionWorker(fresh_db, SwallowsItsError(), max_attempts=1)

    async def scenario() -> None:
        await drain(worker)
        assert len(await worker.parked_events()) == 1
        await worker.release()
        with pytest.raises(SwallowedDatabaseError):
            await rebuild(fresh_db, SwallowsItsError())
        assert len(await worker.parked_events()) == 1
        # Retried with the same handler, it still fails: it stays parked, not "applied".
        assert await worker.retry_parked() == 0
        assert len(await worker.parked_events()) == 1
        await worker.close()

    asyncio.run(scenario())
    assert counts(fresh_db) == {"acct-w": (3, 4)}


def test_a_projection_worker_stops_at_a_checkpoint_the_log_does_not_hold(
    fresh_store: Store, fresh_db: str
) -> None:
    fresh_store.append("acct-1", [NewEvent(type="Added", data={"n": n}) for n in range(3)])
    worker = ProjectionWorker(fresh_db, Counting(), owner="w1")

    async def scenario() -> None:
        await drain(worker)
        await worker.close()
        assert counts(fresh_db) == {"acct-1": (3, 3)}
        # What a crash after asynchronous commits leaves: a checkpoint past the log's
        # newest event, which later events may be stored below.
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            conn.execute(
                "UPDATE pgstate.checkpoints SET tx = (tx::text::bigint + 5)::text::xid8"
                " WHERE projection = 'counting'"
            )
        fresh_store.append("acct-1", [NewEvent(type="Added", data={"n": 9})])
        with pytest.raises(PositionNotInLog):
            await worker.run_once()
        assert counts(fresh_db) == {"acct-1": (3, 3)}  # nothing applied
        with psycopg.connect(libpq_dsn(fresh_db)) as conn:
            owner = conn.execute(
                "SELECT owner FROM pgstate.checkpoints WHERE projection = 'counting'"
            ).fetchone()
        assert owner == (None,)  # the lease was released, not left to expire
        await worker.close()

    asyncio.run(scenario())
