"""Deadlines that can always fire, instance migrations under concurrent writers, and leases
given up on finished instances. Each test registers machines under a name of its own, so
their versions do not depend on what other tests registered."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgstate import DeadlinePassed, InvalidInput, LeaseHeld, Store
from pgstate._connect import libpq_dsn
from pgstate.errors import translate
from pgstate.machine import Machine, State

SHORT = timedelta(milliseconds=200)


def waiter(name: str, *, timed: bool) -> type[Machine]:
    """A machine whose 'waiting' state times out to 'expired' when ``timed``, and does not
    time out at all otherwise (its second version)."""
    waiting = (
        State(initial=True, timeout=SHORT, on_timeout="expire") if timed else State(initial=True)
    )
    expired, done = State(final=True), State(final=True)
    namespace: dict[str, Any] = {
        "name": name,
        "waiting": waiting,
        "expired": expired,
        "done": done,
        "expire": waiting.to(expired),
        "finish": waiting.to(done),
        "nudge": waiting.to(waiting),
    }
    return type(f"Waiter{'Timed' if timed else 'Plain'}", (Machine,), namespace)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_a_migrated_state_without_a_timeout_loses_its_deadline(store: Store) -> None:
    name = unique("Waiter")
    store.register(waiter(name, timed=True))
    stream = unique("waiter")
    store.create(stream, name)
    head = store.stream_state(stream)
    assert head is not None and head.deadline_at is not None
    old_deadline = head.deadline_at
    assert store.register(waiter(name, timed=False)).version == 2

    assert store.migrate_instances(name, 1, 2, {}) == 1

    head = store.stream_state(stream)
    assert head is not None and (head.machine_version, head.deadline_at) == (2, None)
    # Once the old deadline has passed (a wait for the clock, not for another actor), the
    # lease of another owner still holds, and no sweep fails.
    while datetime.now(old_deadline.tzinfo) <= old_deadline:
        time.sleep(0.01)
    store.acquire_lease(stream, "worker-b", timedelta(seconds=30))
    with pytest.raises(LeaseHeld):
        store.transition(stream, "finish")
    assert stream not in [fired.stream_id for fired in store.fire_due_timeouts(10_000)]


def test_a_stale_deadline_stored_earlier_neither_breaks_sweeps_nor_skips_leases(
    store: Store, pgstate_db: str
) -> None:
    """An instance left with a deadline its state cannot fire, as migrations before 0010
    left them (written here directly)."""
    name = unique("Waiter")
    store.register(waiter(name, timed=False))
    stream = unique("waiter")
    store.create(stream, name)
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as conn:
        conn.execute(
            "UPDATE pgstate.streams SET deadline_at = clock_timestamp() - interval '1 second'"
            " WHERE stream_id = %s",
            (stream,),
        )
    assert stream not in [fired.stream_id for fired in store.fire_due_timeouts(10_000)]
    store.acquire_lease(stream, "worker-b", timedelta(seconds=30))
    with pytest.raises(DeadlinePassed):
        store.transition(stream, "finish")
    head = store.stream_state(stream)
    assert head is not None and (head.state, head.version) == ("waiting", 1)


@pytest.mark.parametrize(
    "states",
    [
        {"a": {"timeout_ms": 1000}, "b": {}},
        {"a": {"on_timeout": "go"}, "b": {}},
        {"a": {"timeout_ms": 1000, "on_timeout": "nowhere"}, "b": {}},
    ],
    ids=["timeout-alone", "on-timeout-alone", "on-timeout-without-edge"],
)
def test_the_server_refuses_a_timeout_without_its_edge(
    pgstate_db: str, states: dict[str, Any]
) -> None:
    definition = {
        "name": "Direct",
        "initial": "a",
        "states": states,
        "edges": [{"from": "a", "event": "go", "to": "b"}],
    }
    with (
        psycopg.connect(libpq_dsn(pgstate_db)) as conn,
        pytest.raises(psycopg.Error) as refused,
    ):
        conn.execute(
            "SELECT pgstate.register_machine_v1(%s, repeat('a', 64), %s::jsonb)",
            (unique("Direct"), psycopg.types.json.Jsonb(definition)),
        )
    error = translate(refused.value)
    assert isinstance(error, InvalidInput) and error.detail["field"] == "definition"


def wait_for_a_lock_waiter(dsn: str) -> None:
    """Until some backend waits on an advisory lock (the migration, behind the test's)."""
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as watcher:
        deadline = time.monotonic() + 10
        while True:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND wait_event = 'advisory' AND datname = current_database()"
            ).fetchone()
            if waiting is not None and waiting[0] > 0:
                return
            assert time.monotonic() < deadline, "the migration never waited for the lock"
            time.sleep(0.01)


@pytest.mark.parametrize(("event", "moved"), [("nudge", 2), ("finish", 1)])
def test_a_writer_that_commits_mid_batch_does_not_fail_the_migration(
    store: Store, pgstate_db: str, event: str, moved: int
) -> None:
    name = unique("Waiter")
    store.register(waiter(name, timed=False))
    prefix = unique("mv")
    first, second = f"{prefix}-1", f"{prefix}-2"  # the batch locks them in this order
    for stream in (first, second):
        store.create(stream, name)
    store.register(waiter(name, timed=True))
    outcome: list[Any] = []

    def migrate() -> None:
        try:
            outcome.append(store.migrate_instances(name, 1, 2, {}))
        except Exception as exc:  # reported by the assertion below, with its type
            outcome.append(exc)

    with psycopg.connect(libpq_dsn(pgstate_db)) as writer:
        # The writer holds the second stream's lock, with no transaction id yet.
        writer.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"default/{second}",)
        )
        migration = threading.Thread(target=migrate)
        migration.start()
        wait_for_a_lock_waiter(pgstate_db)
        # It now writes (its transaction id is newer than any the migration may have taken
        # so far) and commits; then the migration gets the lock.
        store.transition(second, event, expected_state="waiting", conn=writer)
        writer.commit()
        migration.join(timeout=30)
    assert not migration.is_alive()
    assert outcome == [moved], outcome
    head = store.stream_state(first)
    assert head is not None and (head.machine_version, head.version) == (2, 2)
    types = [e.type for e in store.read_stream(second)]
    if event == "nudge":  # still live: migrated after the writer's event
        assert types[1:] == ["nudge", "$migrated"]
    else:  # finished before the migration reached it: left as it is
        assert types[1:] == ["finish"]


def test_a_lease_is_given_up_on_a_finished_instance(store: Store) -> None:
    name = unique("Waiter")
    store.register(waiter(name, timed=False))
    stream = unique("waiter")
    store.create(stream, name)
    lease = store.acquire_lease(stream, "worker-a", timedelta(seconds=30))
    store.transition(stream, "finish", lease_epoch=lease.epoch)
    store.release_lease(lease)
    head = store.stream_state(stream)
    assert head is not None and head.state == "done" and head.lease_owner is None


def test_a_client_key_shaped_like_the_sweepers_does_not_block_the_timeout(store: Store) -> None:
    """The sweeper once used 'timeout:<stream>:<version>' as its idempotency key, in the
    clients' namespace: a client key of that form on the same stream blocked the timeout
    for good (a rejection on every sweep). The sweeper now gives no key: it already runs
    under the stream lock at the version it read."""
    name = unique("Waiter")
    store.register(waiter(name, timed=True))
    stream = unique("waiter")
    store.create(stream, name)
    nudged = store.transition(stream, "nudge", idempotency_key=f"timeout:{stream}:2")
    assert nudged.version == 2 and nudged.deadline_at is not None
    while datetime.now(nudged.deadline_at.tzinfo) <= nudged.deadline_at:
        time.sleep(0.01)

    fired = [item for item in store.fire_due_timeouts(10_000) if item.stream_id == stream]

    assert [(item.event, item.from_state, item.to_state, item.version) for item in fired] == [
        ("expire", "waiting", "expired", 3)
    ]
    history = store.history(stream)
    assert [event.type for event in history.events][-1] == "expire"
    assert history.rejections == []
