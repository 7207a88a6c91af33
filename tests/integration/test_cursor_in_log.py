"""A listener whose cursor names an event the log does not hold (lost in a crash, or taken
from another database) stops with PositionNotInLog instead of reading on and skipping
whatever is stored below the cursor later. A cursor before the log's start is sound."""

from __future__ import annotations

import time

import pytest

from pgstate import NewEvent, PositionNotInLog, Store
from pgstate.listen import Listener
from pgstate.models import Position

pytestmark = pytest.mark.committing


def test_a_listener_refuses_a_cursor_past_events_the_log_does_not_hold(
    fresh_store: Store, fresh_db: str
) -> None:
    fresh_store.append("s-1", [NewEvent(type="A")])
    last = fresh_store.append("s-2", [NewEvent(type="B")])
    missing = Position(last.last_position.tx, last.last_position.pos + 1000)
    listener = Listener(fresh_db, after=missing, poll_interval=0.01)
    try:
        # Bounded: a listener that accepted the cursor would wait for events forever.
        deadline = time.monotonic() + 5
        with pytest.raises(PositionNotInLog) as refused:
            list(listener.batches(lambda: time.monotonic() > deadline))
        assert refused.value.position == missing
        assert refused.value.detail == {"position": str(missing)}
        assert listener.position == missing  # the cursor stays where it was
    finally:
        listener.close()


@pytest.mark.parametrize("start", [None, Position(0, 0), "stored"])
def test_a_listener_reads_on_from_a_stored_event_or_from_before_the_log(
    fresh_store: Store, fresh_db: str, start: Position | str | None
) -> None:
    first = fresh_store.append("s-1", [NewEvent(type="A")])
    fresh_store.append("s-2", [NewEvent(type="B")])
    after = first.last_position if start == "stored" else start
    assert not isinstance(after, str)
    with Listener(fresh_db, after=after, poll_interval=0.01) as listener:
        batch = next(listener.batches())
    expected = ["s-2"] if start == "stored" else ["s-1", "s-2"]
    assert [event.stream_id for event in batch] == expected
