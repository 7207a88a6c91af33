"""What a caller of the SQL functions cannot do, even when it bypasses the Python client:
plant a definition under another's hash, register a final state with a timeout, leave the
sweeper stuck on an instance that can never time out, lock the log by setting the notify
mode it already has, or store a snapshot of a version the stream has not reached."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgstate import IdempotencyKeyReused, InvalidInput, NewEvent, PgStateError, Settings, Store
from pgstate._connect import libpq_dsn
from pgstate.errors import translate
from pgstate.fold import Fold
from pgstate.listen import set_notify_mode
from pgstate.machine import Machine, State
from pgstate.models import RecordedEvent


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def server_error(dsn: str, statement: str, params: tuple[Any, ...]) -> PgStateError:
    """The pgstate error a statement ends in, run straight on the server."""
    with psycopg.connect(libpq_dsn(dsn)) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(statement, params)
    return translate(caught.value)


def test_a_definition_planted_under_a_machines_hash_is_refused(
    store: Store, pgstate_db: str
) -> None:
    machine_name = unique("Order")

    class Order(Machine):
        name = machine_name
        placed = State(initial=True)
        paid = State()
        shipped = State(final=True)
        pay = placed.to(paid)
        ship = paid.to(shipped)

    planted = Order.definition()
    planted["edges"].append({"event": "ship_now", "from": "placed", "to": "shipped"})
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:
        conn.execute(
            "SELECT * FROM pgstate.register_machine_v1(%s, %s, %s)",
            (machine_name, Order.def_hash(), Jsonb(planted)),
        )
    with pytest.raises(IdempotencyKeyReused, match="another definition"):
        store.register(Order)


def test_a_final_state_with_a_timeout_is_refused_by_the_server(pgstate_db: str) -> None:
    definition = {
        "initial": "open",
        "states": {
            "open": {"final": False},
            "trap": {"final": True, "timeout_ms": 1, "on_timeout": "again"},
        },
        "edges": [
            {"event": "close", "from": "open", "to": "trap"},
            {"event": "again", "from": "trap", "to": "trap"},
        ],
    }
    error = server_error(
        pgstate_db,
        "SELECT * FROM pgstate.register_machine_v1('FinalTimeout', %s, %s)",
        ("0" * 64, Jsonb(definition)),
    )
    assert isinstance(error, InvalidInput) and "final state" in str(error)


def test_the_sweeper_skips_a_final_state_that_has_a_deadline(store: Store, pgstate_db: str) -> None:
    """A final state with a deadline (written directly: registration refuses one) is never
    a candidate, so it can neither fill the audit table nor hold other timeouts back."""
    machine_name = unique("Closing")

    class Closing(Machine):
        name = machine_name
        open = State(initial=True, timeout=timedelta(hours=1), on_timeout="expire")
        closed = State(final=True)
        close = open.to(closed)
        expire = open.to(closed)

    store.register(Closing)
    finished, due = unique("closing-"), unique("closing-")
    store.create(finished, Closing)
    store.transition(finished, "close")
    store.create(due, Closing)
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:
        conn.execute(
            "UPDATE pgstate.streams SET deadline_at = now() - interval '1 hour'"
            " WHERE stream_id = ANY(%s)",
            ([finished, due],),
        )
        conn.execute(
            "UPDATE pgstate.machine_states SET timeout = interval '1 ms', on_timeout = 'expire'"
            " WHERE name = %s AND state = 'closed'",
            (machine_name,),
        )
    fired = [item.stream_id for item in store.fire_due_timeouts(10_000)]
    assert due in fired and finished not in fired
    assert store.history(finished).rejections == []


def test_setting_the_notify_mode_it_has_takes_no_lock_on_the_log(
    store: Store, pgstate_db: str
) -> None:
    with psycopg.connect(libpq_dsn(pgstate_db)) as holder:  # a transaction left open
        set_notify_mode(holder, "relay")
        set_notify_mode(holder, "relay")
        locks = holder.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
            " AND relation = 'pgstate.events'::regclass"
        ).fetchone()
        assert locks == (0,)
        assert store.append(unique("during-"), [NewEvent(type="Noted")]).version == 1
        holder.rollback()


class Count(Fold):
    name = "count"

    def initial(self) -> dict[str, Any]:
        return {"n": 0}

    def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        return {"n": state["n"] + 1}


def test_a_snapshot_of_a_version_the_stream_has_not_reached_is_not_stored(
    store: Store, pgstate_db: str
) -> None:
    stream = unique("counted-")
    store.append(stream, [NewEvent(type="Counted") for _ in range(4)])
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:
        for version in (5, 2**62, 0, -1):
            conn.execute(
                "SELECT pgstate.save_snapshot_v1('default', %s, %s, %s, %s::jsonb)",
                (stream, Count().fold_hash(), version, json.dumps({"n": 10**6})),
            )
    folded = store.load_state(stream, Count())
    assert folded.state == {"n": 4} and folded.snapshot_version is None
    store.append(stream, [NewEvent(type="Counted")])
    assert store.load_state(stream, Count()).state == {"n": 5}


@pytest.mark.parametrize(
    "rules",
    [
        {"final": "true", "timeout_ms": 1, "on_timeout": "again"},
        {"final": "yes"},
        {"final": True, "timeout_ms": "1", "on_timeout": "again"},
        {"final": False, "timeout_ms": "100000000000000000", "on_timeout": "again"},
        "final",
    ],
    ids=["final-as-string", "final-yes", "timeout-as-string", "huge-timeout-string", "not-object"],
)
def test_state_rules_of_the_wrong_json_type_are_refused(pgstate_db: str, rules: Any) -> None:
    definition = {
        "initial": "open",
        "states": {"open": {"final": False}, "trap": rules},
        "edges": [
            {"event": "close", "from": "open", "to": "trap"},
            {"event": "again", "from": "trap", "to": "trap"},
        ],
    }
    error = server_error(
        pgstate_db,
        "SELECT * FROM pgstate.register_machine_v1('WrongTypes', %s, %s)",
        ("1" * 64, Jsonb(definition)),
    )
    assert isinstance(error, InvalidInput)


def test_setting_the_notify_mode_repairs_a_trigger_the_config_disagrees_with(
    fresh_db: str,
) -> None:
    """A data-only restore with triggers disabled and enabled again turns the notify
    trigger on while the config still says relay: setting relay turns it off again."""
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        set_notify_mode(conn, "relay")
        conn.execute("ALTER TABLE pgstate.events DISABLE TRIGGER ALL")
        conn.execute("ALTER TABLE pgstate.events ENABLE TRIGGER ALL")
        set_notify_mode(conn, "relay")
        state = conn.execute(
            "SELECT tgenabled FROM pg_trigger"
            " WHERE tgrelid = 'pgstate.events'::regclass AND tgname = 'events_notify'"
        ).fetchone()
    assert state == ("D",)


FENCED_CALLS = {
    "save_checkpoint, no epoch": (
        "SELECT pgstate.save_checkpoint_v1(%s, 0, NULL, '9'::xid8, 9, 60000)",
        "SM005",
    ),
    "save_checkpoint, no position": (
        "SELECT pgstate.save_checkpoint_v1(%s, 0, 1, NULL, NULL, 60000)",
        "SM012",
    ),
    "save_checkpoint, a century's lease": (
        "SELECT pgstate.save_checkpoint_v1(%s, 0, 1, '9'::xid8, 9, 3153600000000)",
        "SM012",
    ),
    "fence, no epoch": (
        "SELECT pgstate.fence_projection_v1(%s, 0, NULL, '0'::xid8, 0, 60000)",
        "SM005",
    ),
    "fence, no position": (
        "SELECT pgstate.fence_projection_v1(%s, 0, 1, NULL, NULL, 60000)",
        "SM005",
    ),
    "fence, a century's lease": (
        "SELECT pgstate.fence_projection_v1(%s, 0, 1, '0'::xid8, 0, 3153600000000)",
        "SM012",
    ),
}


@pytest.mark.parametrize("call", sorted(FENCED_CALLS))
def test_a_projection_fence_refuses_null_epochs_positions_and_endless_leases(
    store: Store, pgstate_db: str, call: str
) -> None:
    projection = unique("fenced")
    statement, sqlstate = FENCED_CALLS[call]
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as conn:
        conn.execute(
            "SELECT pgstate.claim_projection_v1(%s, 0, 1, 'worker-1', 60000, false)",
            (projection,),
        )
        checkpoint = "SELECT owner, epoch, tx::text, pos, lease_expires_at FROM pgstate.checkpoints"
        before = conn.execute(f"{checkpoint} WHERE projection = %s", (projection,)).fetchall()
    error = server_error(pgstate_db, statement, (projection,))
    assert error.sqlstate == sqlstate
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:
        after = conn.execute(f"{checkpoint} WHERE projection = %s", (projection,)).fetchall()
    assert after == before and before[0][:2] == ("worker-1", 1)


@pytest.mark.parametrize("call", ["renew_lease_v1", "release_lease_v1"])
def test_a_stream_lease_refuses_a_null_epoch(store: Store, pgstate_db: str, call: str) -> None:
    class Leased(Machine):
        name = "LeasedForNullEpochs"
        open = State(initial=True)
        shut = State(final=True)
        close = open.to(shut)

    store.register(Leased)
    stream = unique("leased-")
    store.create(stream, Leased)
    store.acquire_lease(stream, "w1", timedelta(seconds=30))
    before = store.stream_state(stream)
    statement = {
        "renew_lease_v1": "SELECT * FROM pgstate.renew_lease_v1('default', %s, 'w1', NULL, 1000)",
        "release_lease_v1": "SELECT pgstate.release_lease_v1('default', %s, 'w1', NULL)",
    }[call]
    assert server_error(pgstate_db, statement, (stream,)).sqlstate == "SM005"
    assert store.stream_state(stream) == before


BAD_EDGES = {
    "out of a final state": [
        {"event": "close", "from": "open", "to": "done"},
        {"event": "reopen", "from": "done", "to": "open"},
    ],
    "to an unknown state": [{"event": "close", "from": "open", "to": "nowhere"}],
    "from an unknown state": [
        {"event": "close", "from": "open", "to": "done"},
        {"event": "go", "from": "nowhere", "to": "done"},
    ],
    "twice for one state and event": [
        {"event": "close", "from": "open", "to": "done"},
        {"event": "close", "from": "open", "to": "open"},
    ],
    "a state that is not a string": [{"event": "close", "from": "open", "to": 1}],
    "not an object": [["open", "close", "done"]],
}


@pytest.mark.parametrize("case", sorted(BAD_EDGES))
def test_the_server_refuses_a_definition_whose_edges_break_the_machine(
    pgstate_db: str, case: str
) -> None:
    """Definitions sent through SQL (the Python classes refuse these themselves)."""
    name = unique("BadEdges")
    definition = {
        "initial": "open",
        "states": {"open": {"final": False}, "done": {"final": True}},
        "edges": BAD_EDGES[case],
    }
    error = server_error(
        pgstate_db,
        "SELECT * FROM pgstate.register_machine_v1(%s, %s, %s)",
        (name, "0" * 64, Jsonb(definition)),
    )
    assert isinstance(error, InvalidInput) and "each edge" in str(error)
    with psycopg.connect(libpq_dsn(pgstate_db)) as conn:
        stored = conn.execute("SELECT count(*) FROM pgstate.machines WHERE name = %s", (name,))
        assert stored.fetchone() == (0,)


class Sized(Machine):
    name = "SizedPayloads"
    open = State(initial=True)
    done = State(final=True)
    close = open.to(done)


@pytest.mark.parametrize(
    "call",
    ["create data", "transition data", "transition actor", "append actor", "release_lease"],
)
def test_transitions_and_creates_keep_the_payload_limits(
    store: Store, pgstate_db: str, call: str
) -> None:
    small = Store(pgstate_db, settings=Settings(max_event_bytes=1000))
    store.register(Sized)
    stream = unique("sized-")
    store.create(stream, Sized)
    before = store.stream_state(stream)
    big = {"text": "x" * 1000}
    with pytest.raises(InvalidInput) as refused:
        if call == "create data":
            small.create(unique("sized-"), Sized, data=big)
        elif call == "transition data":
            small.transition(stream, "close", data=big)
        elif call == "transition actor":
            small.transition(stream, "close", actor={"name": "x" * 70_000})
        elif call == "append actor":
            small.append(unique("plain-"), [NewEvent(type="T")], actor={"name": "x" * 70_000})
        else:
            small.transition(stream, "close", release_lease="false")  # type: ignore[arg-type]
    assert refused.value.detail["field"] in {"data", "actor", "release_lease"}
    assert store.stream_state(stream) == before
    small.close()
