"""N writers on real parallel connections race on the same streams with expected versions.
Checked over the whole history: every acknowledged append is stored exactly once at its
acknowledged version with its payload, versions are contiguous, nothing unacknowledged is
stored, and no version is acknowledged twice."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from typing import Any

import psycopg
import pytest

from pgstate import NewEvent, Store, VersionConflict
from pgstate._connect import libpq_dsn
from pgstate.models import Position

pytestmark = pytest.mark.committing

STREAMS = [f"hot-{n}" for n in range(5)]
PER_WRITER = 60


def race(dsn: str, writer: int, conn: psycopg.Connection[Any] | None) -> list[tuple[str, int, str]]:
    """Append PER_WRITER events, each at the version last read; on a conflict, re-read."""
    store = Store(dsn)
    acked: list[tuple[str, int, str]] = []
    attempts = 0
    while len(acked) < PER_WRITER:
        stream = STREAMS[(writer + attempts) % len(STREAMS)]
        attempts += 1
        head = store.stream_state(stream, conn=conn)
        version = head.version if head is not None else 0
        event = NewEvent(type="Raced", data={"writer": writer, "n": len(acked)})
        try:
            result = store.append(stream, [event], expected_version=version, conn=conn)
        except VersionConflict:
            continue
        assert result.version == version + 1
        acked.append((stream, result.version, str(event.event_id)))
    store.close()
    return acked


def process_writer(dsn: str, writer: int, out: Any) -> None:
    out.put(race(dsn, writer, None))


def check_history(store: Store, acked: list[tuple[str, int, str]]) -> None:
    versions = Counter((stream, version) for stream, version, _ in acked)
    assert max(versions.values()) == 1, "a version was acknowledged twice"
    stored: dict[tuple[str, int], str] = {}
    for stream in STREAMS:
        events = store.read_stream(stream)
        assert [e.version for e in events] == list(range(1, len(events) + 1))
        for event in events:
            stored[(stream, event.version)] = str(event.event_id)
    assert len(stored) == len(acked), "something unacknowledged was stored (or lost)"
    for stream, version, event_id in acked:
        assert stored[(stream, version)] == event_id
    # The global log holds each event once, in increasing position order.
    seen: list[Position] = []
    after = None
    while True:
        page = store.read_all(after=after, limit=97)
        if not page.events:
            break
        seen.extend(e.position for e in page.events)
        after = page.last_position
    assert len(seen) == len(acked) == len(set(seen))
    assert seen == sorted(seen)


def test_threads_racing_on_shared_streams(fresh_db: str) -> None:
    results: list[list[tuple[str, int, str]]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def writer(number: int) -> None:
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            barrier.wait()
            acked = race(fresh_db, number, conn)
        with lock:
            results.append(acked)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    acked = [item for batch in results for item in batch]
    assert len(acked) == 8 * PER_WRITER
    with Store(fresh_db) as store:
        check_history(store, acked)


def test_processes_racing_on_shared_streams(fresh_db: str) -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=process_writer, args=(fresh_db, n, out)) for n in range(4)]
    for process in processes:
        process.start()
    acked = [item for _ in processes for item in out.get(timeout=120)]
    for process in processes:
        process.join(timeout=30)
    assert len(acked) == 4 * PER_WRITER
    with Store(fresh_db) as store:
        check_history(store, acked)


def test_racing_retries_of_one_batch_store_it_once(fresh_db: str) -> None:
    batch = [NewEvent(type="Paid", data={"n": n}) for n in range(3)]
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []

    def send() -> None:
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            store = Store(fresh_db)
            barrier.wait()
            outcomes.append(store.append("pay-1", batch, expected_version=0, conn=conn))
            store.close()

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(r.duplicate for r in outcomes) == [False, True]
    first, second = outcomes
    assert (first.from_version, first.version, first.last_position) == (
        second.from_version,
        second.version,
        second.last_position,
    )
    with Store(fresh_db) as store:
        assert [e.data["n"] for e in store.read_stream("pay-1")] == [0, 1, 2]
