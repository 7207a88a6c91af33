"""State machines enforced in PostgreSQL: registration, instances, every rejection code,
leases, deadlines, idempotency keys, audit and instance migration."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from pgstate import (
    DeadlinePassed,
    GuardRejected,
    IdempotencyKeyReused,
    IllegalTransition,
    InvalidInput,
    LeaseHeld,
    LeaseLost,
    NotFound,
    StaleState,
    Store,
    TerminalState,
    UnknownDefinition,
    VersionConflict,
)
from pgstate._connect import libpq_dsn
from pgstate.errors import translate
from pgstate.machine import Guard, Machine, MachineDefinitionError, State, machine_from_definition

SHORT = timedelta(milliseconds=150)


class Outcome(BaseModel):
    result: str
    score: float | None = None


class Job(Machine):
    queued = State(initial=True)
    running = State(timeout=SHORT, on_timeout="expire")
    done = State(final=True)

    start = queued.to(running, requires_lease=True)
    finish = running.to(done, guard=Guard(payload=Outcome, actor_kinds=["worker"]))
    pause = running.to(queued)
    expire = running.to(queued)


class JobV2(Machine):
    """Job, second version: 'running' split into 'working'."""

    name = "Job"
    queued = State(initial=True)
    working = State()
    done = State(final=True)

    start = queued.to(working)
    finish = working.to(done)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def passed(moment: object) -> Callable[[], bool]:
    from datetime import datetime

    assert isinstance(moment, datetime)
    return lambda: datetime.now(moment.tzinfo) > moment


def new_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module", autouse=True)
def registered(store: Store) -> None:
    store.register(Job)


WORKER = {"kind": "worker", "name": "w1"}


def started(store: Store) -> tuple[str, int]:
    stream = new_id()
    store.create(stream, Job)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=30))
    store.transition(
        stream, "start", expected_state="queued", expected_version=1, lease_epoch=lease.epoch
    )
    return stream, lease.epoch


def test_register_is_idempotent_and_versions_changes(store: Store) -> None:
    again = store.register(Job)
    assert again.created is False and again.version == 1
    assert again.def_hash == Job.def_hash()
    changed = store.register(JobV2)
    assert changed.created is True and changed.version == 2
    assert store.register(JobV2).created is False


def test_create_and_happy_path_with_audit(store: Store) -> None:
    stream = new_id()
    instance = store.create(stream, Job, data={"input": 1}, actor={"kind": "api"})
    assert (instance.state, instance.version, instance.machine_version) == ("queued", 1, 1)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=30))
    assert lease.epoch == 1 and lease.state == "queued"
    result = store.transition(
        stream,
        "start",
        expected_state="queued",
        expected_version=1,
        lease_epoch=lease.epoch,
        actor=WORKER,
        reason="picked up",
        idempotency_key="start-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    assert (result.outcome, result.from_state, result.to_state, result.version) == (
        "applied",
        "queued",
        "running",
        2,
    )
    assert result.deadline_at is not None and result.lock_wait_us is not None
    done = store.transition(
        stream,
        "finish",
        expected_state="running",
        expected_version=2,
        lease_epoch=lease.epoch,
        actor=WORKER,
        data={"result": "ok"},
    )
    assert done.to_state == "done"
    state = store.stream_state(stream)
    assert state is not None
    assert (state.state, state.version, state.machine, state.deadline_at) == (
        "done",
        3,
        "Job",
        None,
    )
    history = store.history(stream)
    assert [e.type for e in history.events] == ["$created", "start", "finish"]
    start = history.events[1]
    assert start.actor == WORKER
    assert start.metadata["reason"] == "picked up"
    assert start.metadata["idempotency_key"] == "start-1"
    assert start.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert {e.machine_version for e in history.events} == {1}
    assert history.rejections == []


def test_create_twice_conflicts_and_retry_with_event_id_is_duplicate(store: Store) -> None:
    stream = new_id()
    event_id = uuid.uuid4()
    first = store.create(stream, Job, event_id=event_id)
    retry = store.create(stream, Job, event_id=event_id)
    assert retry.duplicate and retry.position == first.position
    with pytest.raises(VersionConflict):
        store.create(stream, Job)


def test_unregistered_definition_is_refused(store: Store) -> None:
    class Unknown(Machine):
        a = State(initial=True)
        b = State(final=True)
        go = a.to(b)

    with pytest.raises(UnknownDefinition):
        store.create(new_id(), Unknown)


def test_not_found_and_plain_stream(store: Store) -> None:
    with pytest.raises(NotFound) as caught:
        store.transition(new_id(), "start")
    assert caught.value.current_version == 0


def test_illegal_transition_carries_current_state(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    with pytest.raises(IllegalTransition) as caught:
        store.transition(stream, "finish", expected_state="queued", expected_version=1)
    assert caught.value.current_state == "queued"
    assert caught.value.current_version == 1


def test_stale_state_and_version(store: Store) -> None:
    stream, epoch = started(store)
    with pytest.raises(StaleState) as stale:
        store.transition(stream, "pause", expected_state="queued", lease_epoch=epoch)
    assert stale.value.current_state == "running"
    with pytest.raises(VersionConflict) as conflict:
        store.transition(
            stream, "pause", expected_state="running", expected_version=1, lease_epoch=epoch
        )
    assert conflict.value.current_version == 2


def test_a_b_a_with_stale_version_is_refused(store: Store) -> None:
    stream, epoch = started(store)
    store.transition(
        stream, "pause", expected_state="running", expected_version=2, lease_epoch=epoch
    )
    # Back in 'queued' as at version 1; the agent that read version 1 must not pass.
    with pytest.raises(VersionConflict):
        store.transition(
            stream, "start", expected_state="queued", expected_version=1, lease_epoch=epoch
        )
    assert [e.type for e in store.read_stream(stream)] == ["$created", "start", "pause"]


def test_lease_required_and_held(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    with pytest.raises(LeaseLost):
        store.transition(stream, "start", expected_state="queued", expected_version=1)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=30))
    with pytest.raises(LeaseHeld) as held:
        store.acquire_lease(stream, "w2", timedelta(seconds=30))
    assert held.value.lease_owner == "w1"
    same = store.acquire_lease(stream, "w1", timedelta(seconds=30))
    assert same.epoch == lease.epoch
    with pytest.raises(LeaseHeld):
        store.transition(stream, "start", expected_state="queued", expected_version=1)


def test_late_writer_after_lease_expiry_is_fenced(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    old = store.acquire_lease(stream, "slow", timedelta(milliseconds=50))
    wait_until(passed(old.expires_at))
    new = store.acquire_lease(stream, "fast", timedelta(seconds=30))
    assert new.epoch == old.epoch + 1
    # The late writer's expected state and version still match: only the epoch fences it.
    with pytest.raises(LeaseLost) as lost:
        store.transition(
            stream, "start", expected_state="queued", expected_version=1, lease_epoch=old.epoch
        )
    assert lost.value.lease_owner == "fast"
    with pytest.raises(LeaseLost):
        store.renew_lease(old, timedelta(seconds=1))
    with pytest.raises(LeaseLost):
        store.release_lease(old)
    assert (
        store.transition(
            stream, "start", expected_state="queued", expected_version=1, lease_epoch=new.epoch
        ).version
        == 2
    )


def test_expired_lease_without_successor_is_lost(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    lease = store.acquire_lease(stream, "w1", timedelta(milliseconds=50))
    wait_until(passed(lease.expires_at))
    with pytest.raises(LeaseLost):
        store.transition(
            stream, "start", expected_state="queued", expected_version=1, lease_epoch=lease.epoch
        )


def test_renew_and_release(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=1))
    renewed = store.renew_lease(lease, timedelta(seconds=60))
    assert renewed.epoch == lease.epoch and renewed.expires_at > lease.expires_at
    store.release_lease(renewed)
    state = store.stream_state(stream)
    assert state is not None and state.lease_owner is None
    assert store.acquire_lease(stream, "w2", timedelta(seconds=5)).epoch == lease.epoch + 1


def test_idempotency_key_returns_original_result_after_version_moved(store: Store) -> None:
    stream, epoch = started(store)
    first = store.transition(
        stream,
        "pause",
        expected_state="running",
        expected_version=2,
        lease_epoch=epoch,
        idempotency_key="pause-1",
    )
    store.transition(
        stream, "start", expected_state="queued", expected_version=3, lease_epoch=epoch
    )
    retry = store.transition(
        stream,
        "pause",
        expected_state="running",
        expected_version=2,
        lease_epoch=epoch,
        idempotency_key="pause-1",
    )
    assert retry.outcome == "duplicate"
    assert (retry.version, retry.position, retry.to_state) == (
        first.version,
        first.position,
        first.to_state,
    )
    assert [e.type for e in store.read_stream(stream)].count("pause") == 1


def test_idempotency_key_reused_for_other_request(store: Store) -> None:
    stream, epoch = started(store)
    store.transition(
        stream,
        "pause",
        expected_state="running",
        expected_version=2,
        lease_epoch=epoch,
        idempotency_key="k",
    )
    with pytest.raises(IdempotencyKeyReused):
        store.transition(
            stream,
            "start",
            expected_state="queued",
            expected_version=3,
            lease_epoch=epoch,
            idempotency_key="k",
        )


def test_deadline_passed_then_timeout_edge_fences_lease(store: Store) -> None:
    stream, epoch = started(store)
    state = store.stream_state(stream)
    assert state is not None and state.deadline_at is not None
    wait_until(passed(state.deadline_at))
    # No sweeper has run: the function itself checks the clock.
    with pytest.raises(DeadlinePassed):
        store.transition(
            stream,
            "finish",
            expected_state="running",
            expected_version=2,
            lease_epoch=epoch,
            actor=WORKER,
            data={"result": "late"},
        )
    fired = store.transition(stream, "expire", expected_state="running", expected_version=2)
    assert fired.to_state == "queued" and fired.lease_epoch == epoch + 1
    with pytest.raises(LeaseLost):
        store.transition(
            stream, "start", expected_state="queued", expected_version=3, lease_epoch=epoch
        )


def test_terminal_state(store: Store) -> None:
    stream, epoch = started(store)
    store.transition(stream, "finish", lease_epoch=epoch, actor=WORKER, data={"result": "ok"})
    with pytest.raises(TerminalState) as caught:
        store.transition(stream, "pause", lease_epoch=epoch)
    assert caught.value.current_state == "done"
    with pytest.raises(TerminalState):
        store.acquire_lease(stream, "w9", timedelta(seconds=1))


@pytest.mark.parametrize(
    ("actor", "data", "fragment"),
    [
        ({"kind": "human"}, {"result": "ok"}, "actor kind"),
        (None, {"result": "ok"}, "actor kind"),
        (WORKER, {}, "required key result"),
        (WORKER, {"result": 3}, "expected"),
    ],
)
def test_guard_rejects(
    store: Store, actor: dict[str, str] | None, data: dict[str, object], fragment: str
) -> None:
    stream, epoch = started(store)
    with pytest.raises(GuardRejected) as caught:
        store.transition(stream, "finish", lease_epoch=epoch, actor=actor, data=data)
    assert fragment in str(caught.value)
    assert caught.value.current_state == "running"


def test_try_transition_returns_and_records_rejections(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    result = store.try_transition(
        stream, "finish", expected_state="queued", actor={"kind": "worker"}, reason="trying"
    )
    assert result.outcome == "rejected" and not result.applied
    assert isinstance(result.error, IllegalTransition)
    assert result.from_state == "queued" and result.version == 1
    rejections = store.history(stream).rejections
    assert [(r.event, r.code, r.reason) for r in rejections] == [("finish", "SM002", "trying")]
    assert rejections[0].detail["state"] == "queued"
    ok = store.try_transition(stream, "start", expected_state="queued")
    assert isinstance(ok.error, LeaseLost)


def test_bad_input_is_refused_and_changes_nothing(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    for kwargs in (
        {"expected_version": -1},
        {"lease_epoch": True},
        {"idempotency_key": ""},
        {"data": {"x": float("nan")}},
    ):
        with pytest.raises(InvalidInput):
            store.transition(stream, "start", **kwargs)
    with pytest.raises(InvalidInput):
        store.transition("", "start")
    with pytest.raises(InvalidInput):
        store.acquire_lease(stream, "w1", timedelta(0))
    state = store.stream_state(stream)
    assert state is not None and (state.version, state.state, state.lease_owner) == (
        1,
        "queued",
        None,
    )


def test_fire_due_timeouts(store: Store) -> None:
    streams = [started(store)[0] for _ in range(3)]
    last = store.stream_state(streams[-1])
    assert last is not None and last.deadline_at is not None
    wait_until(passed(last.deadline_at))
    fired = store.fire_due_timeouts(limit=100)
    ours = {f.stream_id: f for f in fired if f.stream_id in streams}
    assert set(ours) == set(streams)
    assert {(f.event, f.from_state, f.to_state, f.version) for f in ours.values()} == {
        ("expire", "running", "queued", 3)
    }
    assert [f for f in store.fire_due_timeouts(limit=100) if f.stream_id in streams] == []
    for stream in streams:
        [*_, last_event] = store.read_stream(stream)
        assert last_event.type == "expire" and last_event.metadata["timeout"] is True
        assert last_event.actor == {"kind": "system", "name": "deadline-sweeper"}


def test_migrate_instances(store: Store) -> None:
    stream = new_id()
    store.create(
        stream,
        Job,
    )
    v1 = store.register(Job)
    v2 = store.register(JobV2)
    assert v2.version > v1.version or not v2.created
    with pytest.raises(InvalidInput) as partial:
        store.migrate_instances("Job", 1, v2.version, {})
    assert "running" in str(partial.value)
    state = store.stream_state(stream)
    assert state is not None and state.machine_version == 1
    moved = store.migrate_instances("Job", 1, v2.version, {"running": "working"})
    assert moved >= 1
    state = store.stream_state(stream)
    assert state is not None and (state.machine_version, state.state, state.version) == (
        v2.version,
        "queued",
        2,
    )
    migrated = store.read_stream(stream)[-1]
    assert migrated.type == "$migrated" and migrated.data["to_version"] == v2.version
    # The instance now follows version 2's rules: 'start' needs no lease there.
    assert store.transition(stream, "start", expected_version=2).to_state == "working"


def test_record_as_names_the_stored_event(store: Store) -> None:
    stream = new_id()
    store.create(stream, Job)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=5))
    store.transition(stream, "start", lease_epoch=lease.epoch, record_as="JobStarted")
    last = store.read_stream(stream)[-1]
    assert (last.type, last.metadata["event"], last.metadata["to_state"]) == (
        "JobStarted",
        "start",
        "running",
    )
    with pytest.raises(InvalidInput):
        store.transition(stream, "pause", lease_epoch=lease.epoch, record_as="")


def test_register_from_a_migration_connection(store: Store) -> None:
    from pgstate.migrate import register_machine

    class Shipment(Machine):
        packed = State(initial=True)
        shipped = State(final=True)
        ship = packed.to(shipped)

    with store.engine.begin() as conn:
        first = register_machine(conn, Shipment)
    with store.engine.begin() as conn:
        again = register_machine(conn, Shipment)
    assert first.created and not again.created and first.version == again.version == 1
    assert store.create(new_id(), Shipment).state == "packed"


def test_plain_append_to_an_instance_is_refused(store: Store) -> None:
    from pgstate import NewEvent

    stream = new_id()
    store.create(stream, Job)
    with pytest.raises(InvalidInput) as caught:
        store.append(stream, [NewEvent(type="Sneaky")], expected_version=1)
    assert "transition" in str(caught.value)
    assert caught.value.current_state == "queued"
    assert [e.type for e in store.read_stream(stream)] == ["$created"]


def test_migrate_instances_in_batches_skips_finished(store: Store) -> None:
    from pgstate._machine_ops import MIGRATION_BATCH

    class Batch(Machine):
        name = "Batch"
        a = State(initial=True)
        b = State(final=True)
        go = a.to(b)

    class BatchV2(Machine):
        name = "Batch"
        a = State(initial=True)
        c = State()
        b = State(final=True)
        go = a.to(c)
        end = c.to(b)

    store.register(Batch)
    live = [f"batch-{n:05d}" for n in range(MIGRATION_BATCH + 7)]
    for stream in live:
        store.create(stream, Batch)
    store.create("batch-done", Batch)
    store.transition("batch-done", "go")
    v2 = store.register(BatchV2)
    assert store.migrate_instances("Batch", 1, v2.version, {}) == len(live)
    finished = store.stream_state("batch-done")
    assert finished is not None and (finished.machine_version, finished.state) == (1, "b")
    assert store.transition(live[-1], "go").to_state == "c"
    with pytest.raises(InvalidInput):
        store.migrate_instances("Batch", 1, 2**40, {})


def test_retried_create_must_match(store: Store) -> None:
    stream = new_id()
    event_id = uuid.uuid4()
    store.create(stream, Job, data={"x": 1}, event_id=event_id)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=5))
    store.transition(stream, "start", lease_epoch=lease.epoch)
    retry = store.create(stream, Job, data={"x": 1}, event_id=event_id)
    assert retry.duplicate and (retry.state, retry.version) == ("running", 2)
    with pytest.raises(IdempotencyKeyReused):
        store.create(stream, Job, data={"x": 2}, event_id=event_id)


NAMES_TO_AGREE_ON = [
    "Ticket",
    "billing.Ticket",
    "billing-Ticket_v2",
    "T" + "x" * 99,
    "billing:Ticket",
    "has space",
    "9Ticket",
    "Ticket\n",
    "T" + "x" * 100,
]


@pytest.mark.parametrize("name", NAMES_TO_AGREE_ON, ids=repr)
def test_client_and_server_agree_on_machine_names(store: Store, pgstate_db: str, name: str) -> None:
    """A name the class accepts registers; one it refuses, the server refuses too, so no
    machine can be declared that cannot be registered."""
    try:
        machine = type("Named", (Machine,), {"name": name, "a": State(initial=True)})
    except MachineDefinitionError:
        with (
            psycopg.connect(libpq_dsn(pgstate_db)) as connection,
            pytest.raises(psycopg.Error) as refused,
        ):
            connection.execute(
                "SELECT pgstate.register_machine_v1(%s, repeat('0', 64), '{}')", (name,)
            )
        error = translate(refused.value)
        assert isinstance(error, InvalidInput)
        assert error.detail["field"] == "machine"
        return
    registered = store.register(machine)
    assert registered.version >= 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("expected_version", 2**63), ("lease_epoch", 2**64), ("lease_epoch", -1)],
    ids=["version-2**63", "epoch-2**64", "epoch-negative"],
)
def test_numbers_beyond_a_bigint_are_invalid_input(store: Store, field: str, value: int) -> None:
    stream, epoch = started(store)
    before = store.stream_state(stream)
    arguments: dict[str, Any] = {"expected_version": 2, "lease_epoch": epoch, field: value}
    with pytest.raises(InvalidInput) as refused:
        store.transition(stream, "pause", expected_state="running", **arguments)
    assert refused.value.detail["field"] == field
    with pytest.raises(InvalidInput):
        store.try_transition(stream, "pause", expected_state="running", **arguments)
    assert store.stream_state(stream) == before


@pytest.mark.parametrize("epoch", ["1", None, 2**63, True], ids=repr)
def test_a_lease_with_a_bad_epoch_is_invalid_input(store: Store, epoch: Any) -> None:
    stream = new_id()
    store.create(stream, Job)
    lease = store.acquire_lease(stream, "w1", timedelta(seconds=30))
    forged = dataclasses.replace(lease, epoch=epoch)
    with pytest.raises(InvalidInput) as refused:
        store.renew_lease(forged, timedelta(seconds=60))
    assert refused.value.detail["field"] == "epoch"
    with pytest.raises(InvalidInput):
        store.release_lease(forged)
    state = store.stream_state(stream)
    assert state is not None and state.lease_owner == "w1"  # still held, unchanged


@pytest.mark.parametrize(
    "state_map",
    [{"queued\x00": "queued"}, {"running": "\ud800"}, {"running": ""}, {"running": 7}],
    ids=["nul", "surrogate", "empty", "int"],
)
def test_a_bad_state_map_is_invalid_input(store: Store, state_map: Any) -> None:
    with pytest.raises(InvalidInput) as refused:
        store.migrate_instances("Job", 1, 2, state_map)
    assert refused.value.detail["field"] == "state_map"


def two_versions(machine_name: str) -> tuple[type[Machine], type[Machine]]:
    """Two definitions under one machine name: 'new' -> 'done', then with a 'held' state."""

    class First(Machine):
        name = machine_name
        new = State(initial=True)
        done = State(final=True)
        finish = new.to(done)

    class Second(Machine):
        name = machine_name
        new = State(initial=True)
        held = State()
        done = State(final=True)
        hold = new.to(held)
        finish = held.to(done)

    return First, Second


def test_registering_an_older_definition_again_answers_with_its_version(store: Store) -> None:
    """A rolling deploy: replicas of the old and the new code register in turns."""
    name = f"Rolling{uuid.uuid4().hex[:8]}"
    first, second = two_versions(name)
    answers = [store.register(machine) for machine in (first, second, first, second, first)]
    assert [(answer.version, answer.created) for answer in answers] == [
        (1, True),
        (2, True),
        (1, False),
        (2, False),
        (1, False),
    ]
    stream = new_id()
    assert store.create(stream, first).machine_version == 1
    assert store.create(new_id(), second).machine_version == 2


def test_a_retried_create_naming_another_definition_is_refused(store: Store) -> None:
    name = f"Retried{uuid.uuid4().hex[:8]}"
    first, second = two_versions(name)
    store.register(first)
    store.register(second)
    stream, event_id = new_id(), uuid.uuid4()
    store.create(stream, first, event_id=event_id)
    assert store.create(stream, first, event_id=event_id).duplicate
    assert store.create(stream, name, event_id=event_id).duplicate  # names no definition
    with pytest.raises(IdempotencyKeyReused) as caught:
        store.create(stream, second, event_id=event_id)
    assert caught.value.current_state == "new" and caught.value.current_version == 1
    # After a migration the retry still matches the definition it was created with.
    assert store.migrate_instances(name, 1, 2, {}) == 1
    assert store.create(stream, first, event_id=event_id).duplicate


def test_migrating_a_version_to_itself_or_with_an_unknown_state_is_refused(store: Store) -> None:
    name = f"Mistyped{uuid.uuid4().hex[:8]}"
    first, second = two_versions(name)
    store.register(first)
    store.register(second)
    stream = new_id()
    store.create(stream, first)
    with pytest.raises(InvalidInput, match="to itself"):
        store.migrate_instances(name, 1, 1, {"new": "done"})
    with pytest.raises(InvalidInput, match='"nwe"') as caught:
        store.migrate_instances(name, 1, 2, {"nwe": "held"})
    assert caught.value.detail["unknown"] == ["nwe"]
    head = store.stream_state(stream)
    assert head is not None and (head.state, head.version, head.machine_version) == ("new", 1, 1)


def test_a_lease_on_a_plain_stream_is_refused(store: Store) -> None:
    from pgstate import NewEvent

    stream = f"plain-{uuid.uuid4().hex[:8]}"
    store.append(stream, [NewEvent(type="Noted")])
    with pytest.raises(NotFound, match="no state-machine instance"):
        store.acquire_lease(stream, "w1", timedelta(seconds=5))
    head = store.stream_state(stream)
    assert head is not None and head.lease_owner is None and head.lease_epoch == 0


@pytest.mark.parametrize("kind", [1, True, None, ["worker"], {"worker": 1}], ids=repr)
def test_an_actor_kind_that_is_not_a_string_fails_the_guard(store: Store, kind: Any) -> None:
    class Gated(Machine):
        name = "GatedByKind"
        open = State(initial=True)
        closed = State(final=True)
        close = open.to(closed, guard=Guard(actor_kinds=["1", "true", "null", "worker"]))

    store.register(Gated)
    stream = new_id()
    store.create(stream, Gated)
    with pytest.raises(GuardRejected):
        store.transition(stream, "close", actor={"kind": kind})
    assert store.transition(stream, "close", actor={"kind": "worker"}).to_state == "closed"


@pytest.mark.parametrize(
    "timeout",
    [timedelta(days=36_501), timedelta(days=200_000_000)],
    ids=["36501-days", "200M-days"],
)
def test_a_timeout_beyond_36500_days_is_a_definition_error(timeout: timedelta) -> None:
    with pytest.raises(MachineDefinitionError, match="36500 days"):

        class Forever(Machine):
            waiting = State(initial=True, timeout=timeout, on_timeout="give_up")
            gone = State(final=True)
            give_up = waiting.to(gone)

        Forever.definition()


def test_a_huge_timeout_in_a_document_is_a_definition_error() -> None:
    document = {
        "name": "HugeTimeout",
        "initial": "waiting",
        "states": {
            "waiting": {"final": False, "timeout_ms": 10**14 * 1000, "on_timeout": "give_up"},
            "gone": {"final": True, "timeout_ms": None, "on_timeout": None},
        },
        "edges": [
            {
                "event": "give_up",
                "from": "waiting",
                "to": "gone",
                "requires_lease": False,
                "guard": None,
            }
        ],
    }
    with pytest.raises(MachineDefinitionError, match="36500 days"):
        machine_from_definition(document)


def test_the_server_refuses_a_timeout_beyond_36500_days(store: Store, pgstate_db: str) -> None:
    definition = {
        "initial": "waiting",
        "states": {
            "waiting": {"final": False, "timeout_ms": 3153600000001, "on_timeout": "give_up"},
            "gone": {"final": True},
        },
        "edges": [{"event": "give_up", "from": "waiting", "to": "gone"}],
    }
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(
            "SELECT * FROM pgstate.register_machine_v1('HugeTimeoutSql', %s, %s::jsonb)",
            ("0" * 64, psycopg.types.json.Jsonb(definition)),
        )
    assert isinstance(translate(caught.value), InvalidInput)


def test_register_from_an_async_migration_connection(store: Store, pgstate_db: str) -> None:
    """An async Alembic environment hands revisions a sync facade over an async
    connection (run_sync): registering from it works as from a sync one."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from pgstate._connect import psycopg_url
    from pgstate.migrate import register_machine

    class Parcel(Machine):
        packed = State(initial=True)
        sent = State(final=True)
        send = packed.to(sent)

    async def scenario() -> tuple[bool, bool]:
        engine = create_async_engine(psycopg_url(pgstate_db))
        async with engine.begin() as conn:
            first = await conn.run_sync(lambda sync_conn: register_machine(sync_conn, Parcel))
        async with engine.begin() as conn:
            again = await conn.run_sync(lambda sync_conn: register_machine(sync_conn, Parcel))
        await engine.dispose()
        return first.created, again.created

    assert asyncio.run(scenario()) == (True, False)
    assert store.create(new_id(), Parcel).state == "packed"
