"""Writers racing on the same streams with exact expected versions, on real parallel
connections (threads with their own psycopg connections, and separate processes with their
own Store). A loser of a race re-reads the stream's version and tries again.

The checks run over the whole recorded history, not only the final state: every
acknowledged append is stored exactly once, at its acknowledged version and position, with
its payload; each stream's versions are 1..n; nothing unacknowledged is stored; no version
is acknowledged twice; and read_all returns every event once, in increasing position order.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import psycopg
import pytest

from pgstate import (
    AppendResult,
    ExpectedVersion,
    NewEvent,
    Position,
    RecordedEvent,
    Store,
    VersionConflict,
)
from pgstate._connect import libpq_dsn

pytestmark = pytest.mark.committing

WRITERS = 8
STREAMS = [f"race-{n}" for n in range(5)]
APPENDS_PER_WRITER = 40
DEADLINE = 120.0  # seconds; a writer or a join that takes longer fails the test


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledged append, as the writer saw it."""

    stream_id: str
    version: int
    event_id: str
    position: tuple[int, int]
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WriterLog:
    acks: list[Ack]
    conflicts: int


def race(
    store: Store,
    writer: int,
    wait_for_start: Callable[[], object],
    conn: psycopg.Connection[Any] | None,
) -> WriterLog:
    """Append APPENDS_PER_WRITER single events, each at the version this writer last read.
    The first attempt of every writer targets STREAMS[0] as a new stream, so at least
    WRITERS - 1 attempts conflict whatever the timing."""
    rng = random.Random(writer)
    known = dict.fromkeys(STREAMS, 0)
    acks: list[Ack] = []
    conflicts = 0
    stream = STREAMS[0]
    wait_for_start()
    while len(acks) < APPENDS_PER_WRITER:
        data = {"writer": writer, "n": len(acks), "attempt": conflicts + len(acks)}
        event = NewEvent(type="Raced", data=data)
        try:
            result = store.append(stream, [event], expected_version=known[stream], conn=conn)
        except VersionConflict as conflict:
            conflicts += 1
            assert conflict.stream_id == stream
            assert conflict.expected_version == known[stream]
            head = store.stream_state(stream, conn=conn)
            assert head is not None, "a conflict on a stream that does not exist"
            assert head.version > known[stream], "the head moved backwards"
            known[stream] = head.version
            continue
        assert (result.from_version, result.version) == (known[stream] + 1, known[stream] + 1)
        assert result.duplicate is False
        assert result.first_position == result.last_position
        known[stream] = result.version
        position = (result.first_position.tx, result.first_position.pos)
        acks.append(Ack(stream, result.version, str(event.event_id), position, data))
        stream = rng.choice(STREAMS)
    return WriterLog(acks, conflicts)


def read_whole_log(store: Store, page_size: int = 37) -> list[RecordedEvent]:
    """The global log, page by page, following the returned cursor."""
    events: list[RecordedEvent] = []
    after: Position | None = None
    while True:
        page = store.read_all(after=after, limit=page_size)
        if not page.events:
            assert page.last_position == after, "an empty page moved the cursor"
            return events
        assert page.last_position == page.events[-1].position
        events.extend(page.events)
        after = page.last_position


def check_history(store: Store, dsn: str, logs: list[WriterLog]) -> None:
    acks = [ack for log in logs for ack in log.acks]
    assert len(acks) == len(logs) * APPENDS_PER_WRITER
    # At least WRITERS - 1 writers lost the opening race for STREAMS[0].
    assert sum(log.conflicts for log in logs) >= len(logs) - 1

    # No (stream, version) was acknowledged twice, and every event id once.
    twice = [key for key, n in Counter((a.stream_id, a.version) for a in acks).items() if n > 1]
    assert twice == [], f"versions acknowledged twice: {twice}"
    assert len({a.event_id for a in acks}) == len(acks)

    # Each stream holds versions 1..n, and its head row says n.
    stored: dict[tuple[str, int], RecordedEvent] = {}
    for stream in STREAMS:
        events = store.read_stream(stream)
        assert [e.version for e in events] == list(range(1, len(events) + 1)), stream
        head = store.stream_state(stream)
        assert head is not None and head.version == len(events)
        stored.update(((stream, e.version), e) for e in events)

    # Every acknowledged append is stored at its version and position with its payload...
    for ack in acks:
        event = stored.get((ack.stream_id, ack.version))
        assert event is not None, f"acknowledged but not stored: {ack}"
        assert str(event.event_id) == ack.event_id
        assert (event.position.tx, event.position.pos) == ack.position
        assert (event.type, event.data) == ("Raced", ack.data)
    # ...and nothing else is stored, in these streams or anywhere in the log.
    assert len(stored) == len(acks), "an unacknowledged append was stored"
    with psycopg.connect(libpq_dsn(dsn)) as check:
        row = check.execute("SELECT count(*) FROM pgstate.events").fetchone()
    assert row is not None and row[0] == len(acks)

    # The global log returns each event once, positions strictly increasing.
    log = read_whole_log(store)
    positions = [e.position for e in log]
    assert all(a < b for a, b in pairwise(positions))
    assert sorted(str(e.event_id) for e in log) == sorted(a.event_id for a in acks)


def test_threads_racing_with_expected_versions(fresh_db: str) -> None:
    dsn = libpq_dsn(fresh_db)
    barrier = threading.Barrier(WRITERS, timeout=DEADLINE)
    store = Store(fresh_db)  # shared: with conn= given, calls never touch its engine

    def writer(number: int) -> WriterLog:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return race(store, number, barrier.wait, conn)

    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        futures = [pool.submit(writer, n) for n in range(WRITERS)]
        logs = [future.result(timeout=DEADLINE) for future in futures]
    check_history(store, fresh_db, logs)
    store.close()


def process_writer(url: str, number: int, start: Any, out: Any) -> None:
    """A writer process: its own Store (own engine and pool), no shared connection."""
    try:
        with Store(url) as store:
            out.put((number, race(store, number, start.wait, None)))
    except BaseException:
        out.put((number, traceback.format_exc()))


def test_processes_racing_with_expected_versions(fresh_db: str) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WRITERS, timeout=DEADLINE)
    out = context.Queue()
    processes = [
        context.Process(target=process_writer, args=(fresh_db, n, start, out), daemon=True)
        for n in range(WRITERS)
    ]
    for process in processes:
        process.start()
    logs: list[WriterLog] = []
    failures: list[str] = []
    try:
        for _ in processes:
            try:
                number, outcome = out.get(timeout=DEADLINE)
            except queue.Empty:
                pytest.fail(f"a writer process sent nothing within {DEADLINE}s")
            if isinstance(outcome, WriterLog):
                logs.append(outcome)
            else:
                failures.append(f"writer {number}:\n{outcome}")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    assert failures == []
    assert [p.exitcode for p in processes] == [0] * WRITERS
    with Store(fresh_db) as store:
        check_history(store, fresh_db, logs)


def stream_lock_waiters(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    assert row is not None
    return int(row[0])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is a bounded pause between polls
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.005)


@pytest.mark.parametrize(
    "expected", [ExpectedVersion.NO_STREAM, ExpectedVersion.ANY], ids=["exact", "any"]
)
def test_racing_retries_of_one_batch_store_it_once(
    fresh_db: str, expected: ExpectedVersion
) -> None:
    """Three connections send the same batch (same ids, same expected version) at the same
    instant: all three wait on the stream lock held by a fourth, which then lets go."""
    senders = 3
    dsn = libpq_dsn(fresh_db)
    store = Store(fresh_db)
    batch = [NewEvent(type="Paid", data={"n": n}) for n in range(3)]

    def send(conn: psycopg.Connection[Any]) -> AppendResult:
        return store.append("pay-1", batch, expected_version=expected, conn=conn)

    with psycopg.connect(dsn, autocommit=True) as admin, psycopg.connect(dsn) as blocker:
        blocker.execute("SELECT pgstate.lock_stream('default', 'pay-1')")
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(senders)]
        try:
            with ThreadPoolExecutor(max_workers=senders) as pool:
                futures = [pool.submit(send, c) for c in conns]
                wait_until(lambda: stream_lock_waiters(admin) == senders, 30, "lock waiters")
                blocker.commit()
                results = [future.result(timeout=DEADLINE) for future in futures]
        finally:
            for c in conns:
                c.close()

    assert sorted(r.duplicate for r in results) == [False] + [True] * (senders - 1)
    summaries = {
        (r.stream_id, r.from_version, r.version, r.first_position, r.last_position) for r in results
    }
    assert len(summaries) == 1, f"retries returned different results: {summaries}"
    [(_, from_version, to_version, first, last)] = summaries
    assert (from_version, to_version) == (1, 3)
    stored = store.read_stream("pay-1")
    assert [e.event_id for e in stored] == [e.event_id for e in batch]
    assert [e.data for e in stored] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert (stored[0].position, stored[-1].position) == (first, last)
    assert len(read_whole_log(store)) == 3
    store.close()


def test_many_rounds_of_racing_retries(fresh_db: str) -> None:
    """Unforced timing: in each round, two connections released by a barrier send the same
    batch at the stream's current version; exactly one stores it."""
    rounds = 25
    dsn = libpq_dsn(fresh_db)
    store = Store(fresh_db)
    barrier = threading.Barrier(2, timeout=DEADLINE)
    batches = [
        [NewEvent(type="Step", data={"round": r, "i": i}) for i in range(2)] for r in range(rounds)
    ]

    def sender() -> list[AppendResult]:
        results: list[AppendResult] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            for number, batch in enumerate(batches):
                barrier.wait()
                results.append(
                    store.append("steps-1", batch, expected_version=2 * number, conn=conn)
                )
        return results

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(sender) for _ in range(2)]
        left, right = (future.result(timeout=DEADLINE) for future in futures)

    for number, (a, b) in enumerate(zip(left, right, strict=True)):
        assert sorted([a.duplicate, b.duplicate]) == [False, True], number
        assert (a.from_version, a.version) == (b.from_version, b.version)
        assert (a.from_version, a.version) == (2 * number + 1, 2 * number + 2)
        assert (a.first_position, a.last_position) == (b.first_position, b.last_position)
    stored = store.read_stream("steps-1")
    expected_ids = [e.event_id for batch in batches for e in batch]
    assert [e.event_id for e in stored] == expected_ids
    assert [e.version for e in stored] == list(range(1, 2 * rounds + 1))
    store.close()
