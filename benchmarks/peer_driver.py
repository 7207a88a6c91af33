"""pgstate's driver for the shared peer harness (../shared/bench).

Every call goes through pgstate's public API on one psycopg autocommit connection per
process, passed as ``conn=``: one round trip per append (``append_one_v3``) and per transition
(``transition_v3``, which checks state under the stream's advisory lock and appends the
event in the same transaction).

Two drivers: ``pgstate`` (the default notification mode, ``relay``: writers never NOTIFY;
its listener is woken by the server's log stream, or, where the server refuses a
replication connection or PGSTATE_LISTENER_WAL=0, by a ``pgstate relay`` process it starts)
and ``pgstate_commit_notify`` (every writing transaction NOTIFYs), so both modes are
measured in one run.

Run from the project root:

    ../shared/bench/.venv/bin/python ../shared/bench/run.py \
        --driver-file benchmarks/peer_driver.py --drivers raw,pgstate,eventsourcing --scale small
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
from harness.driver import Conflict, Driver, Event  # type: ignore[import-not-found]
from sqlalchemy import create_engine

from pgstate import ExpectedVersion, NewEvent, StaleState, Store, TerminalState, VersionConflict
from pgstate._connect import psycopg_url
from pgstate.listen import Listener, open_doorbell, set_notify_mode
from pgstate.machine import Machine, State
from pgstate.migrate import upgrade
from pgstate.models import Position, RecordedEvent

# The relay's poll interval in seconds, as deployed with `pgstate relay --interval`: an
# event waits half of it on average before the relay notifies. PGSTATE_RELAY_INTERVAL
# overrides it, to measure the trade between lag and the relay's polling.
RELAY_INTERVAL = os.environ.get("PGSTATE_RELAY_INTERVAL", "0.001")
# How the relay is woken (`pgstate relay --wake`): "poll" every RELAY_INTERVAL, or "wal"
# when the server streams newly flushed log. PGSTATE_RELAY_WAKE overrides it.
RELAY_WAKE = os.environ.get("PGSTATE_RELAY_WAKE", "poll")
# The listener wakes on the server's log stream itself (`Listener(wal_wakeups=True)`), as a
# deployment that wants the lowest lag configures it; it then needs no relay. Set
# PGSTATE_LISTENER_WAL=0 for the relay and LISTEN instead.
LISTENER_WAL = os.environ.get("PGSTATE_LISTENER_WAL", "1") == "1"

# The harness wants one int per event that increases in read_all order; pgstate's position
# is the pair (tx, pos), ordered by tx, then pos. (tx << 40) | pos keeps that order and
# decodes back exactly while pos < 2**40 (a trillion events), far beyond any benchmark.
POS_BITS = 40
POS_MASK = (1 << POS_BITS) - 1


class BenchTicket(Machine):
    """The harness's lifecycle, as a pgstate machine (no leases: the harness's agents race
    by compare-and-set on the state, which pgstate checks under the stream lock)."""

    name = "BenchTicket"
    new = State(initial=True)
    classifying = State()
    classified = State()
    drafting = State()
    draft_ready = State()
    escalating = State()
    resolved = State(final=True)

    start_classifying = new.to(classifying)
    classify = classifying.to(classified)
    start_drafting = classified.to(drafting)
    draft = drafting.to(draft_ready)
    start_escalating = draft_ready.to(escalating)
    resolve = escalating.to(resolved)


EVENT_FOR_EDGE = {
    (edge["from"], edge["to"]): edge["event"] for edge in BenchTicket.definition()["edges"]
}


def encode(position: Position) -> int:
    if position.pos > POS_MASK:
        raise OverflowError(f"pos {position.pos} does not fit the harness position encoding")
    return (position.tx << POS_BITS) | position.pos


def decode(number: int) -> Position | None:
    """The read_all cursor for a harness position (0 or less: from the start)."""
    if number <= 0:
        return None
    return Position(number >> POS_BITS, number & POS_MASK)


def expected(version: int | None) -> ExpectedVersion | int:
    """The harness's expected version as pgstate's: None appends at the end whatever the
    version, 0 means the stream must not exist yet, n means exactly n."""
    if version is None:
        return ExpectedVersion.ANY
    if version == 0:
        return ExpectedVersion.NO_STREAM
    return version


# tuple.__new__ skips the named tuple's Python-level __new__, as pgstate's own read path does.
_new_tuple = tuple.__new__


def to_event(event: RecordedEvent) -> Event:
    fields = (encode(event.position), event.stream_id, event.version, event.type, event.data)
    return _new_tuple(Event, fields)


class PgState(Driver):  # type: ignore[misc]
    name = "pgstate"
    description = "pgstate: append_one_v3 / transition_v3 stored functions under advisory locks"
    backend = "postgres"
    can_transition = True
    can_listen = True
    listen_note = (
        "Listener woken by the server's log stream (a replication connection, no NOTIFY),"
        " catch-up below the xid8 watermark; writers never NOTIFY"
    )
    notify_mode = "relay"

    def setup(self, dsn: str) -> None:
        engine = create_engine(psycopg_url(dsn))
        upgrade(engine)
        engine.dispose()
        with psycopg.connect(dsn, autocommit=True) as conn:
            set_notify_mode(conn, self.notify_mode)
        store = Store(dsn)
        store.register(BenchTicket)
        store.close()

    def connect(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.store = Store(dsn)
        self.version_at_conflict: dict[str, int] = {}

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()

    # ---- event store -------------------------------------------------------------
    def append(
        self, stream_id: str, events: list[dict[str, Any]], expected_version: int | None
    ) -> int:
        batch = [NewEvent(type=e["type"], data=e["data"]) for e in events]
        try:
            result = self.store.append(
                stream_id, batch, expected_version=expected(expected_version), conn=self.conn
            )
        except VersionConflict as conflict:
            # The refusal carries the head row read under the stream lock: the version the
            # harness asks for next, without another round trip.
            if conflict.current_version is not None:
                self.version_at_conflict[stream_id] = conflict.current_version
            raise Conflict(str(conflict)) from None
        return result.version

    def current_version(self, stream_id: str) -> int:
        known = self.version_at_conflict.pop(stream_id, None)
        if known is not None:
            return known
        state = self.store.stream_state(stream_id, conn=self.conn)
        return state.version if state is not None else 0

    def read_stream(self, stream_id: str) -> list[Event]:
        return [to_event(e) for e in self.store.read_stream(stream_id, conn=self.conn)]

    def read_all(self, after_position: int, limit: int) -> list[Event]:
        page = self.store.read_all(after=decode(after_position), limit=limit, conn=self.conn)
        return [to_event(e) for e in page.events]

    # ---- state machine -----------------------------------------------------------
    def create_entities(self, ids: list[int], state: str) -> None:
        assert state == "NEW"
        for entity_id in ids:
            self.store.create(f"ticket-{entity_id}", BenchTicket, conn=self.conn)

    def transition(self, entity_id: int, from_state: str, to_state: str) -> bool:
        return self.transition_and_record(entity_id, from_state, to_state, "", {})

    def transition_and_record(
        self,
        entity_id: int,
        from_state: str,
        to_state: str,
        stream_id: str,
        event: dict[str, Any],
    ) -> bool:
        source, target = from_state.lower(), to_state.lower()
        try:
            self.store.transition(
                f"ticket-{entity_id}",
                EVENT_FOR_EDGE[(source, target)],
                expected_state=source,
                data=event.get("data"),
                record_as=event.get("type"),
                conn=self.conn,
            )
        except (StaleState, TerminalState):
            # Another agent moved it first (possibly all the way to the final state).
            return False
        return True

    def find_in_state(self, state: str, limit: int) -> list[int]:
        ids = self.store.find_in_state(BenchTicket, state.lower(), limit=limit, conn=self.conn)
        return [int(stream_id.rsplit("-", 1)[1]) for stream_id in ids]

    def get_states(self, ids: list[int]) -> dict[int, str]:
        states: dict[int, str] = {}
        for entity_id in ids:
            head = self.store.stream_state(f"ticket-{entity_id}", conn=self.conn)
            if head is not None and head.state is not None:
                states[entity_id] = head.state.upper()
        return states

    # ---- subscriptions -------------------------------------------------------------
    def listen(
        self,
        after_position: int,
        on_events: Callable[[list[Event]], None],
        should_stop: Callable[[], bool],
    ) -> None:
        relay = None
        wal_wakeups = LISTENER_WAL and self.notify_mode == "relay"
        if wal_wakeups:
            doorbell, refusal = open_doorbell(self.dsn)
            if doorbell is None:
                print(f"pgstate: no log stream ({refusal}); LISTEN and the relay instead")
                wal_wakeups = False
            else:
                doorbell.close()
        if self.notify_mode == "relay" and not wal_wakeups:
            # Its own process, as deployed (`pgstate relay`): a thread here would wait for
            # the GIL behind the listener's decoding.
            relay = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgstate.cli",
                    "relay",
                    "--dsn",
                    self.dsn,
                    "--interval",
                    RELAY_INTERVAL,
                    "--wake",
                    RELAY_WAKE,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert relay.stdout is not None
            relay.stdout.readline()  # connected: from here on it notifies
        listener = Listener(
            self.dsn,
            wal_wakeups=wal_wakeups,
            after=decode(after_position),
            poll_interval=0.05,
            stall_after=timedelta(minutes=10),
        )
        try:
            for batch in listener.batches(should_stop):
                on_events([to_event(e) for e in batch])
        finally:
            listener.close()
            if relay is not None:
                relay.terminate()
                relay.wait(timeout=5)


class PgStateCommitNotify(PgState):
    name = "pgstate_commit_notify"
    description = "pgstate with NOTIFY in every writing transaction (notify mode 'commit')"
    listen_note = "Listener (LISTEN + catch-up below the xid8 watermark), commit mode"
    notify_mode = "commit"
