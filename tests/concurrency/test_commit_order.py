"""Commit order versus position order.

A row's ``pos`` is taken at INSERT, not at COMMIT, so a reader that tails ``WHERE pos >
last`` loses a row whose transaction took a lower ``pos`` and committed after a higher one
was read. These tests reproduce that race against the naive reader (which must lose the
row: the race is real), and show that pgstate's ``read_all`` (ordered by ``(tx, pos)``,
below the snapshot's xmin) holds back what may still be overtaken, then delivers every
event exactly once, in a deterministic schedule and under random concurrent writers.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import psycopg
import pytest

from pgstate import (
    AppendResult,
    ExpectedVersion,
    NewEvent,
    Page,
    Position,
    RecordedEvent,
    SerializationFailure,
    Store,
    StreamAppend,
)
from pgstate._connect import libpq_dsn

pytestmark = pytest.mark.committing

# How a reader that tails by sequence number reads; pgstate does not read this way.
NAIVE_TAIL = "SELECT pos, stream_id, version FROM pgstate.events WHERE pos > %s ORDER BY pos"

DEADLINE = 60.0  # seconds, for every wait in this module


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is a bounded pause between polls
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.002)


def lock_waiters(admin: psycopg.Connection[Any]) -> int:
    """Sessions waiting for a stream lock (an advisory lock not yet granted)."""
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    assert row is not None
    return int(row[0])


def read_pages(
    store: Store, after: Position | None, limit: int, conn: psycopg.Connection[Any]
) -> tuple[list[RecordedEvent], Position | None]:
    """Page read_all until an empty page; returns the events and the final cursor."""
    events: list[RecordedEvent] = []
    while True:
        page: Page = store.read_all(after=after, limit=limit, conn=conn)
        if not page.events:
            assert page.last_position == after, "an empty page moved the cursor"
            return events, after
        assert len(page.events) <= limit
        events.extend(page.events)
        after = page.last_position


def event(kind: str, **data: Any) -> list[NewEvent]:
    return [NewEvent(type=kind, data=data)]


def test_late_commit_is_lost_by_pos_reader_and_delivered_by_read_all(fresh_db: str) -> None:
    dsn = libpq_dsn(fresh_db)
    store = Store(fresh_db)
    for n in range(3):
        store.append(f"before-{n}", event("Before", n=n))
    with (
        psycopg.connect(dsn) as a,  # not autocommit: its transaction stays open
        psycopg.connect(dsn, autocommit=True) as b,
        psycopg.connect(dsn, autocommit=True) as reader,
    ):
        # Both readers are caught up with the three committed events.
        naive = reader.execute(NAIVE_TAIL, (0,)).fetchall()
        assert [row[1] for row in naive] == ["before-0", "before-1", "before-2"]
        naive_cursor = naive[-1][0]
        caught_up, cursor = read_pages(store, None, 2, reader)
        assert [e.stream_id for e in caught_up] == ["before-0", "before-1", "before-2"]

        # A takes the lower position and stays open; B takes a higher one and commits.
        early = store.append("slow-1", event("Early"), conn=a)
        late = store.append("fast-1", event("Late"), conn=b)
        assert early.first_position.pos < late.first_position.pos
        assert early.first_position.tx < late.first_position.tx

        # The naive reader sees B's row and moves its cursor past A's position.
        naive = reader.execute(NAIVE_TAIL, (naive_cursor,)).fetchall()
        assert [(row[1], row[2]) for row in naive] == [("fast-1", 1)]
        naive_cursor = naive[-1][0]
        assert naive_cursor > early.first_position.pos

        # pgstate's reader returns nothing at or after A's position while A is open.
        held_back, cursor = read_pages(store, cursor, 1, reader)
        assert held_back == []
        everything, _ = read_pages(store, None, 100, reader)
        assert [e.stream_id for e in everything] == ["before-0", "before-1", "before-2"]
        assert all(e.position < early.first_position for e in everything)

        a.commit()

        # The naive reader's next read misses A's event, which is now committed.
        assert reader.execute(NAIVE_TAIL, (naive_cursor,)).fetchall() == []
        stored = reader.execute(
            "SELECT pos FROM pgstate.events WHERE stream_id = 'slow-1'"
        ).fetchall()
        assert stored == [(early.first_position.pos,)], "committed, yet never delivered"

        # pgstate's reader delivers both, A first (commit order is safe to follow now),
        # each exactly once, whatever the page size.
        for limit in (1, 2, 50):
            delivered, final = read_pages(store, cursor, limit, reader)
            assert [(e.stream_id, e.type) for e in delivered] == [
                ("slow-1", "Early"),
                ("fast-1", "Late"),
            ]
            assert [e.position for e in delivered] == [early.first_position, late.first_position]
            assert final == late.last_position
            assert read_pages(store, final, limit, reader) == ([], final)
    store.close()


def test_older_transaction_holds_back_younger_commits(fresh_db: str) -> None:
    """The mirror case: A's transaction id is older, but its row takes a higher position
    after B committed. Delivering B first would move the cursor past A's (tx, pos)."""
    dsn = libpq_dsn(fresh_db)
    store = Store(fresh_db)
    with (
        psycopg.connect(dsn) as a,
        psycopg.connect(dsn, autocommit=True) as b,
        psycopg.connect(dsn, autocommit=True) as reader,
    ):
        a.execute("SELECT pg_current_xact_id()")  # A takes its transaction id first
        young = store.append("young-1", event("Young"), conn=b)
        old = store.append("old-1", event("Old"), conn=a)
        assert old.first_position.pos > young.first_position.pos
        assert old.first_position.tx < young.first_position.tx

        # B is committed, but A may still land below it in (tx, pos) order.
        assert read_pages(store, None, 10, reader) == ([], None)
        a.commit()
        delivered, _ = read_pages(store, None, 1, reader)
        assert [e.stream_id for e in delivered] == ["old-1", "young-1"]
        assert [e.position for e in delivered] == [old.first_position, young.first_position]
    store.close()


def append_many_in_own_transaction(store: Store, dsn: str) -> list[AppendResult]:
    return store.append_many(
        [StreamAppend("a-1", event("A")), StreamAppend("b-1", event("Second"))]
    )


def appends_in_caller_transaction(store: Store, dsn: str) -> list[AppendResult]:
    with psycopg.connect(dsn) as x:
        try:
            results = [
                store.append("a-1", event("A"), conn=x),
                store.append("b-1", event("Second"), conn=x),
            ]
        except BaseException:
            x.rollback()
            raise
        x.commit()
        return results


@pytest.mark.parametrize(
    ("write", "must_refuse"),
    [(append_many_in_own_transaction, False), (appends_in_caller_transaction, True)],
    ids=["append_many", "caller_transaction"],
)
def test_multi_stream_writer_keeps_per_stream_order(
    fresh_db: str,
    write: Callable[[Store, str], list[AppendResult]],
    must_refuse: bool,
) -> None:
    """X writes a-1 and b-1 in one transaction and has to wait for b-1's lock while a
    younger transaction Y writes b-1's version 1 and commits. Had X taken its transaction
    id before Y (by writing a-1 first) and then written version 2, read_all would deliver
    b-1's versions as 2, 1. pgstate either orders X after Y (append_many may take all its
    locks before its first write) or refuses X as a transient serialization failure, which
    the writer retries in a new transaction. Either way: 1 before 2, nothing twice."""
    dsn = libpq_dsn(fresh_db)
    store = Store(fresh_db)
    refusals: list[SerializationFailure] = []

    def writer_with_retry() -> list[AppendResult]:
        for _ in range(3):
            try:
                return write(store, dsn)
            except SerializationFailure as refused:
                refusals.append(refused)
        raise AssertionError("refused three times")

    with (
        psycopg.connect(dsn) as y,
        psycopg.connect(dsn, autocommit=True) as admin,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        # Y holds b-1's lock (a condition check takes it, and no transaction id).
        store.check_version("b-1", ExpectedVersion.ANY, conn=y)
        x = pool.submit(writer_with_retry)
        wait_until(lambda: lock_waiters(admin) == 1, "X waiting on b-1")
        first = store.append("b-1", event("First"), conn=y)
        y.commit()
        a, second = x.result(timeout=DEADLINE)
        # Visible to tailing readers once no older transaction is open anywhere in the
        # cluster (another session on a shared server can hold that back for a moment).
        store.wait_for(second.last_position)
        delivered, _ = read_pages(store, None, 10, admin)

    assert len(refusals) == 1 if must_refuse else len(refusals) <= 1
    for refused in refusals:
        assert refused.retryable
        assert (refused.stream_id, refused.current_version) == ("b-1", 1)
    assert (first.version, a.version, second.version) == (1, 1, 2)
    assert first.last_position < a.first_position <= second.first_position
    assert [(e.stream_id, e.version, e.type) for e in delivered] == [
        ("b-1", 1, "First"),
        ("a-1", 1, "A"),
        ("b-1", 2, "Second"),
    ]
    store.close()


@dataclass(frozen=True, slots=True)
class Acked:
    stream_id: str
    version: int
    event_id: str
    append: AppendResult  # the acknowledged append the event was part of


@dataclass(frozen=True, slots=True)
class WriterLog:
    acked: list[Acked]
    rolled_back: list[str]


STREAMS = [f"tail-{n}" for n in range(6)]
WRITERS = 4
TRANSACTIONS_PER_WRITER = 60


def write_randomly(store: Store, dsn: str, writer: int) -> WriterLog:
    """Short transactions on one stream each (1-2 appends of 1-3 events), held open for a
    random moment before commit; one in eight is rolled back instead."""
    rng = random.Random(1000 + writer)
    acked: list[Acked] = []
    rolled_back: list[str] = []
    hold = threading.Event()  # never set: wait() holds a transaction open a moment
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(TRANSACTIONS_PER_WRITER):
            stream = rng.choice(STREAMS)
            abort = rng.random() < 0.125
            pending: list[Acked] = []
            with conn.transaction():
                for _ in range(rng.randint(1, 2)):
                    batch = [
                        NewEvent(type="Tailed", data={"writer": writer, "tx": n, "i": i})
                        for i in range(rng.randint(1, 3))
                    ]
                    result = store.append(stream, batch, conn=conn)
                    assert result.version - result.from_version + 1 == len(batch)
                    pending += [
                        Acked(stream, result.from_version + i, str(e.event_id), result)
                        for i, e in enumerate(batch)
                    ]
                    hold.wait(rng.uniform(0, 0.003))
                if abort:
                    rolled_back += [a.event_id for a in pending]
                    raise psycopg.Rollback()
            if not abort:
                acked += pending  # acknowledged: the commit returned
    return WriterLog(acked, rolled_back)


def test_tailing_reader_under_random_writers_sees_everything_once(fresh_db: str) -> None:
    dsn = libpq_dsn(fresh_db)
    store = Store(fresh_db)
    delivered: list[RecordedEvent] = []
    cursor: Position | None = None
    pause = threading.Event()  # never set: a bounded pause when a page comes back empty
    with (
        ThreadPoolExecutor(max_workers=WRITERS) as pool,
        psycopg.connect(dsn, autocommit=True) as reader,
    ):
        futures: list[Future[WriterLog]] = [
            pool.submit(write_randomly, store, dsn, n) for n in range(WRITERS)
        ]
        deadline = time.monotonic() + DEADLINE
        logs: list[WriterLog] | None = None
        while True:
            page = store.read_all(after=cursor, limit=50, conn=reader)
            delivered.extend(page.events)
            cursor = page.last_position
            if page.events:
                continue
            if logs is None and all(f.done() for f in futures):
                logs = [f.result() for f in futures]  # raises a writer's error
            if logs is not None and len(delivered) >= sum(len(log.acked) for log in logs):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"reader saw {len(delivered)} events within {DEADLINE}s")
            pause.wait(0.001)
        # Caught up: one more read returns nothing.
        assert store.read_all(after=cursor, limit=50, conn=reader).events == []

    acked = {a.event_id: a for log in logs for a in log.acked}
    rolled_back = {event_id for log in logs for event_id in log.rolled_back}
    assert len(acked) == sum(len(log.acked) for log in logs) > 0
    assert rolled_back, "the schedule rolls some transactions back"

    # Every acknowledged event exactly once, nothing else, in strictly increasing order.
    ids = [str(e.event_id) for e in delivered]
    assert [i for i, n in Counter(ids).items() if n > 1] == [], "delivered twice"
    assert set(ids) == set(acked), "missed or unacknowledged events"
    assert not rolled_back & set(ids)
    assert all(a.position < b.position for a, b in pairwise(delivered))
    for e in delivered:
        ack = acked[str(e.event_id)]
        assert (e.stream_id, e.version) == (ack.stream_id, ack.version)
        # Positions of one batch share its transaction id and lie between its bounds (a
        # concurrent batch may take sequence numbers in between).
        assert ack.append.first_position <= e.position <= ack.append.last_position
        assert e.position.tx == ack.append.first_position.tx

    # Commit order differed from pos order (the naive reader's blind spot) many times.
    inversions = sum(a.position.pos > b.position.pos for a, b in pairwise(delivered))
    assert inversions > 0, "nothing committed out of pos order: the race was not exercised"
    # Each stream's versions arrive in order: 1, 2, 3, ...
    per_stream: dict[str, list[int]] = defaultdict(list)
    for e in delivered:
        per_stream[e.stream_id].append(e.version)
    for stream, versions in per_stream.items():
        assert versions == list(range(1, len(versions) + 1)), stream
    store.close()
