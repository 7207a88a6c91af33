"""Races on real parallel connections: a timeout racing a normal event, several sweepers
at once, and agents racing for the same step."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from pgstate import Rejected, Store
from pgstate._connect import libpq_dsn
from pgstate.machine import Machine, State

pytestmark = pytest.mark.committing


class Task(Machine):
    open = State(initial=True)
    running = State(timeout=timedelta(milliseconds=80), on_timeout="expire")
    done = State(final=True)

    start = open.to(running)
    finish = running.to(done)
    expire = running.to(open)


def history_types(store: Store, stream: str) -> list[str]:
    events = store.read_stream(stream)
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    return [e.type for e in events]


def test_timeout_racing_normal_event(fresh_store: Store) -> None:
    store = fresh_store
    store.register(Task)
    streams = [f"task-{n:04d}" for n in range(120)]
    for stream in streams:
        store.create(stream, Task)
    finished: set[str] = set()
    stop = threading.Event()
    fired: list[str] = []

    def sweeper() -> None:
        with psycopg.connect(libpq_dsn(store.engine.url), autocommit=True) as conn:
            while not stop.is_set():
                fired.extend(f.stream_id for f in store.fire_due_timeouts(limit=50, conn=conn))

    def finisher(chunk: list[str]) -> None:
        with psycopg.connect(libpq_dsn(store.engine.url), autocommit=True) as conn:
            for index, stream in enumerate(chunk):
                store.transition(
                    stream, "start", expected_state="open", expected_version=1, conn=conn
                )
                # Aim at the 80 ms deadline: some land just before it, some just after.
                time.sleep(0.060 + 0.001 * (index % 40))
                try:
                    store.transition(
                        stream, "finish", expected_state="running", expected_version=2, conn=conn
                    )
                    finished.add(stream)
                except Rejected:
                    pass

    sweepers = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in sweepers:
        thread.start()
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(finisher, [streams[i::3] for i in range(3)]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = {s: store.stream_state(s) for s in streams}
        if all(st is not None and st.state in ("done", "open") for st in states.values()):
            break
        time.sleep(0.02)
    stop.set()
    for thread in sweepers:
        thread.join()

    # Exactly one of the two racing edges won for every task, never both, never neither.
    assert len(finished) + len(fired) == len(streams)
    assert max(Counter(fired).values()) == 1
    for stream in streams:
        types = history_types(store, stream)
        if stream in finished:
            assert types == ["$created", "start", "finish"], stream
            assert stream not in fired
        else:
            assert types == ["$created", "start", "expire"], stream
            assert stream in fired


def test_agents_racing_for_one_step_apply_it_once(fresh_store: Store) -> None:
    store = fresh_store
    store.register(Task)
    streams = [f"race-{n:03d}" for n in range(60)]
    for stream in streams:
        store.create(stream, Task)
    wins: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def agent(_: int) -> None:
        url: Any = store.engine.url
        with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
            barrier.wait()
            for stream in streams:
                try:
                    store.transition(
                        stream, "start", expected_state="open", expected_version=1, conn=conn
                    )
                except Rejected:
                    continue
                with lock:
                    wins[stream] += 1

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(agent, range(6)))
    assert wins == Counter({stream: 1 for stream in streams})
    for stream in streams:
        assert history_types(store, stream) == ["$created", "start"]


class Door(Machine):
    closed = State(initial=True)
    opened = State()

    open_door = closed.to(opened)
    close_door = opened.to(closed)


WAITING_FOR_A_STREAM_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
)


def test_lock_wait_is_timed_only_when_the_stream_was_busy(fresh_store: Store) -> None:
    store = fresh_store
    store.register(Door)
    store.create("door-1", Door)
    free = store.transition("door-1", "open_door")
    assert free.lock_wait_us == 0
    waited: list[Any] = []
    with psycopg.connect(libpq_dsn(store.engine.url)) as holder:
        # A transition in a transaction left open holds the stream's lock until it ends.
        with holder.transaction():
            store.transition("door-1", "close_door", conn=holder)
            waiter = threading.Thread(
                target=lambda: waited.append(store.transition("door-1", "open_door"))
            )
            waiter.start()
            with psycopg.connect(libpq_dsn(store.engine.url), autocommit=True) as admin:
                deadline = time.monotonic() + 10
                while not admin.execute(WAITING_FOR_A_STREAM_LOCK).fetchall()[0][0]:
                    assert time.monotonic() < deadline, "the second transition never waited"
                    time.sleep(0.005)
            time.sleep(0.3)  # counted from when it was already waiting
            assert not waited, "the second transition went ahead of the lock"
        waiter.join(timeout=10)
    [result] = waited
    assert result.outcome == "applied" and result.from_state == "closed"
    assert 250_000 <= result.lock_wait_us < 10_000_000
