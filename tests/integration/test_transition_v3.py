"""transition_v3's two paths (the plain request that skips the rejection checks, and the
full check sequence) and its wrapper transition_v2 give the same answers; registering a
machine copies each target state's timeout onto its edges."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from pgstate import Rejected, Store
from pgstate._connect import libpq_dsn
from pgstate.machine import Machine, State

ARGS = """'default', %(stream)s, %(event)s, %(state)s, %(version)s, NULL, NULL, NULL, NULL,
    %(epoch)s, NULL, NULL, NULL, NULL, false, 'return', NULL"""
V3 = f"""SELECT outcome, code, from_state, to_state, version, lease_epoch,
    deadline_at IS NOT NULL FROM pgstate.transition_v3({ARGS})"""
V2 = f"""SELECT o_outcome, o_code, o_from_state, o_to_state, o_version, o_lease_epoch,
    o_deadline_at IS NOT NULL FROM pgstate.transition_v2({ARGS})"""


class Valve(Machine):
    shut = State(initial=True)
    opening = State(timeout=timedelta(hours=1), on_timeout="stall")
    open = State()
    stuck = State(final=True)

    start = shut.to(opening)
    finish = opening.to(open)
    stall = opening.to(stuck)
    close = open.to(shut)


@pytest.fixture
def sql_conn(pgstate_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as connection:
        yield connection


# (event, expected state, expected version, lease epoch) in order, from a fresh instance;
# each step runs on twin instances, once through each function.
STEPS: list[tuple[str, str | None, int | None, int | None]] = [
    ("start", "shut", 1, None),  # plain: skips the checks, sets the deadline
    ("start", "shut", None, None),  # stale state: SM003 through the full checks
    ("finish", "opening", 1, None),  # stale version: SM004
    ("close", None, None, None),  # no such edge from opening: SM002
    ("finish", None, None, 0),  # a lease epoch without a lease: SM005
    ("finish", "opening", 2, None),  # plain again, clears the deadline
    ("close", "open", 3, None),
    ("start", None, None, None),
    ("stall", "opening", 5, None),  # deadline not passed yet: SM007 is not due, edge legal
    ("start", None, None, None),  # final state: SM008
]


def test_v3_and_its_v2_wrapper_answer_alike(
    store: Store, sql_conn: psycopg.Connection[Any]
) -> None:
    store.register(Valve)
    twins = {name: f"valve-{uuid.uuid4().hex[:8]}" for name in ("v3", "v2")}
    for stream in twins.values():
        store.create(stream, Valve)
    answers: dict[str, list[Any]] = {"v3": [], "v2": []}
    for event, state, version, epoch in STEPS:
        for name, statement in (("v3", V3), ("v2", V2)):
            params = {
                "stream": twins[name],
                "event": event,
                "state": state,
                "version": version,
                "epoch": epoch,
            }
            answers[name].append(sql_conn.execute(statement, params).fetchone())
    assert answers["v3"] == answers["v2"]
    codes = [row[1] for row in answers["v3"]]
    assert codes == [None, "SM003", "SM004", "SM002", "SM005", None, None, None, None, "SM008"]
    # The applied steps: the first sets the opening state's deadline, the sixth clears it.
    assert [answers["v3"][step][6] for step in (0, 5)] == [True, False]
    heads = sql_conn.execute(
        "SELECT state, version FROM pgstate.streams WHERE stream_id = ANY(%s) ORDER BY 1",
        (list(twins.values()),),
    ).fetchall()
    assert heads == [("stuck", 6), ("stuck", 6)]


def test_register_copies_target_timeouts_onto_edges(
    store: Store, sql_conn: psycopg.Connection[Any]
) -> None:
    registration = store.register(Valve)
    rows = sql_conn.execute(
        "SELECT e.event, e.to_timeout, t.timeout FROM pgstate.machine_edges e"
        " JOIN pgstate.machine_states t ON t.name = e.name AND t.version = e.version"
        " AND t.state = e.to_state WHERE e.name = %s AND e.version = %s ORDER BY e.event",
        (registration.name, registration.version),
    ).fetchall()
    assert [(event, copied) for event, copied, _ in rows] == [
        ("close", None),
        ("finish", None),
        ("stall", None),
        ("start", timedelta(hours=1)),
    ]
    assert all(copied == target for _, copied, target in rows)


class Gate(Machine):
    name = "MessagesGate"
    closed = State(initial=True)
    open = State()
    gone = State(final=True)

    unlock = closed.to(open, requires_lease=True)
    shut = open.to(closed)
    swing = closed.to(open)
    remove = open.to(gone)


def refusal(store: Store, stream: str, event: str, **options: Any) -> tuple[str | None, str]:
    with pytest.raises(Rejected) as refused:
        store.transition(stream, event, **options)
    return refused.value.sqlstate, refused.value.message


def test_each_rejection_has_its_code_and_message(store: Store) -> None:
    store.register(Gate)
    gate = f"gate-{uuid.uuid4().hex[:8]}"
    store.create(gate, Gate)
    assert refusal(store, f"{gate}-missing", "swing") == (
        "SM001",
        f"no state-machine instance {gate}-missing",
    )
    assert refusal(store, gate, "shut") == ("SM002", "no transition shut from state closed")
    assert refusal(store, gate, "swing", expected_state="open") == (
        "SM003",
        f"{gate} is in state closed, expected open",
    )
    assert refusal(store, gate, "swing", expected_version=5) == (
        "SM004",
        f"{gate} is at version 1, expected 5",
    )
    assert refusal(store, gate, "unlock") == ("SM005", "event unlock requires a lease")
    lease = store.acquire_lease(gate, "alice", timedelta(minutes=5))
    assert refusal(store, gate, "swing") == ("SM010", f"alice holds the lease on {gate}")
    assert refusal(store, gate, "unlock", lease_epoch=lease.epoch + 7) == (
        "SM005",
        f"lease epoch {lease.epoch + 7} is stale or expired (current epoch {lease.epoch})",
    )
    store.transition(gate, "unlock", lease_epoch=lease.epoch, release_lease=True)
    store.transition(gate, "remove")
    assert refusal(store, gate, "shut") == ("SM008", f"{gate} is in final state gone")
    # Every refusal left the instance as the applied steps made it.
    head = store.stream_state(gate)
    assert head is not None and (head.state, head.version) == ("gone", 3)
