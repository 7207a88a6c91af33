"""Reads: one stream by version, the whole log and a category in commit order with paging,
type filters, the head row, and the watermark that hides unfinished transactions.

read_all and read_category return only events of finished transactions (below the
snapshot's xmin), so their tests commit on a database of their own (fresh_store) and wait
for the watermark with ``wait_for`` where another session might hold it back."""

from __future__ import annotations

import uuid
from collections import Counter

import psycopg
import pytest
from sqlalchemy import Connection

from pgstate import AppendResult, NewEvent, Position, RecordedEvent, Store, VersionConflict


def events_of(kind: str, n: int, **data: object) -> list[NewEvent]:
    return [NewEvent(type=kind, data={"n": i, **data}) for i in range(n)]


def versions(events: list[RecordedEvent]) -> list[int]:
    return [event.version for event in events]


# --- read_stream -----------------------------------------------------------------------------


@pytest.fixture
def five(store: Store, conn: Connection) -> list[NewEvent]:
    batch = events_of("Added", 5)
    store.append("cart-1", batch[:2], conn=conn)
    store.append("cart-1", batch[2:], conn=conn)
    store.append("cart-2", events_of("Added", 3), conn=conn)
    return batch


def test_read_stream_forward(store: Store, conn: Connection, five: list[NewEvent]) -> None:
    events = store.read_stream("cart-1", conn=conn)
    assert versions(events) == [1, 2, 3, 4, 5]
    assert [e.event_id for e in events] == [e.event_id for e in five]
    assert [e.data["n"] for e in events] == [0, 1, 2, 3, 4]
    assert {(e.stream_id, e.type, e.tenant) for e in events} == {("cart-1", "Added", "default")}
    # All appended in the test's one transaction: one tx, rising pos.
    assert len({e.position.tx for e in events}) == 1
    assert [e.position.pos for e in events] == sorted({e.position.pos for e in events})


@pytest.mark.parametrize(
    ("from_version", "limit", "expected"),
    [
        (None, None, [1, 2, 3, 4, 5]),
        (1, None, [1, 2, 3, 4, 5]),
        (0, None, [1, 2, 3, 4, 5]),
        (3, None, [3, 4, 5]),
        (5, None, [5]),
        (6, None, []),
        (None, 2, [1, 2]),
        (2, 2, [2, 3]),
        (4, 10, [4, 5]),
        (None, 1, [1]),
    ],
)
def test_read_stream_from_version_and_limit(
    store: Store,
    conn: Connection,
    five: list[NewEvent],
    from_version: int | None,
    limit: int | None,
    expected: list[int],
) -> None:
    events = store.read_stream("cart-1", from_version=from_version, limit=limit, conn=conn)
    assert versions(events) == expected


@pytest.mark.parametrize(
    ("from_version", "limit", "expected"),
    [
        (None, None, [5, 4, 3, 2, 1]),
        (None, 2, [5, 4]),
        (3, None, [3, 2, 1]),
        (4, 2, [4, 3]),
        (1, None, [1]),
        (9, None, [5, 4, 3, 2, 1]),
        (0, None, []),
    ],
)
def test_read_stream_backwards(
    store: Store,
    conn: Connection,
    five: list[NewEvent],
    from_version: int | None,
    limit: int | None,
    expected: list[int],
) -> None:
    events = store.read_stream(
        "cart-1", from_version=from_version, limit=limit, backwards=True, conn=conn
    )
    assert versions(events) == expected
    assert {e.stream_id for e in events} <= {"cart-1"}


def test_read_missing_stream(store: Store, conn: Connection, five: list[NewEvent]) -> None:
    assert store.read_stream("cart-404", conn=conn) == []
    assert store.read_stream("cart-404", backwards=True, conn=conn) == []
    assert store.read_stream("cart-404", from_version=1, limit=5, conn=conn) == []
    assert store.stream_state("cart-404", conn=conn) is None
    # Same id, another tenant: missing too.
    assert Store(store.engine, tenant="other").read_stream("cart-1", conn=conn) == []


def test_stream_state_fields(store: Store, conn: Connection) -> None:
    store.append("invoice-7-a", events_of("Drafted", 2), conn=conn)
    state = store.stream_state("invoice-7-a", conn=conn)
    assert state is not None
    assert (state.tenant, state.stream_id, state.category) == ("default", "invoice-7-a", "invoice")
    assert state.version == 2
    assert (state.state, state.machine, state.machine_version) == (None, None, None)
    assert (state.lease_owner, state.lease_epoch, state.lease_expires_at) == (None, 0, None)
    assert state.deadline_at is None
    assert state.archived is False
    assert state.created_at <= state.updated_at
    store.append("invoice-7-a", events_of("Sent", 1), conn=conn)
    later = store.stream_state("invoice-7-a", conn=conn)
    assert later is not None
    assert later.version == 3
    assert later.created_at == state.created_at
    assert later.updated_at >= state.updated_at


def test_stream_without_dash_is_its_own_category(store: Store, conn: Connection) -> None:
    store.append("standalone", events_of("Noted", 1), conn=conn)
    state = store.stream_state("standalone", conn=conn)
    assert state is not None and state.category == "standalone"


def test_own_uncommitted_events_are_not_in_read_all(store: Store, conn: Connection) -> None:
    # Even the writing transaction does not see its own events in the tail: they are not
    # below the watermark until it commits. read_stream sees them.
    tail_before = store.read_all(limit=100_000, conn=conn)
    store.append("cart-9", events_of("Added", 2), conn=conn)
    assert len(store.read_stream("cart-9", conn=conn)) == 2
    tail_after = store.read_all(limit=100_000, conn=conn)
    assert [e.event_id for e in tail_after] == [e.event_id for e in tail_before]
    assert tail_after.last_position == tail_before.last_position
    assert store.read_category("cart", conn=conn).events == []


# --- read_all --------------------------------------------------------------------------------


def fill(store: Store, streams: int, per_stream: int, batch: int) -> list[AppendResult]:
    """Interleave appends over several streams: stream order differs from log order."""
    results: list[AppendResult] = []
    for start in range(0, per_stream, batch):
        for s in range(streams):
            kind = "Paid" if (start // batch + s) % 3 == 0 else "Added"
            results.append(
                store.append(f"bulk{s % 3}-{s}", events_of(kind, batch, stream=s, start=start))
            )
    return results


def test_read_all_pages_through_everything_once_in_order(fresh_store: Store) -> None:
    results = fill(fresh_store, streams=25, per_stream=100, batch=50)
    total = 25 * 100
    fresh_store.wait_for(max(r.last_position for r in results), timeout=60)

    seen: list[RecordedEvent] = []
    sizes: list[int] = []
    after: Position | None = None
    while True:
        page = fresh_store.read_all(after=after, limit=1000)
        sizes.append(len(page))
        if not page.events:
            assert page.last_position == after  # an empty page keeps the cursor
            break
        assert page.last_position == page.events[-1].position
        if seen:
            assert page.events[0].position > seen[-1].position
        seen.extend(page.events)
        after = page.last_position

    assert sizes == [1000, 1000, 500, 0]
    assert len(seen) == total
    assert Counter(e.event_id for e in seen).most_common(1)[0][1] == 1
    positions = [e.position for e in seen]
    assert positions == sorted(positions) and len(set(positions)) == total
    # Each stream's events appear in version order, without gaps.
    by_stream: dict[str, list[int]] = {}
    for event in seen:
        by_stream.setdefault(event.stream_id, []).append(event.version)
    assert len(by_stream) == 25
    assert all(v == list(range(1, 101)) for v in by_stream.values())
    # The log holds exactly what the appends acknowledged.
    acknowledged = {
        Position(r.first_position.tx, pos)
        for r in results
        for pos in range(r.first_position.pos, r.last_position.pos + 1)
    }
    assert set(positions) == acknowledged


def test_read_all_after_as_string(fresh_store: Store) -> None:
    results = fill(fresh_store, streams=3, per_stream=4, batch=2)
    fresh_store.wait_for(results[-1].last_position, timeout=60)
    first = fresh_store.read_all(limit=5)
    assert len(first) == 5
    cursor = first.last_position
    assert cursor is not None
    as_text = fresh_store.read_all(after=str(cursor), limit=100)
    as_position = fresh_store.read_all(after=cursor, limit=100)
    assert [e.event_id for e in as_text] == [e.event_id for e in as_position]
    assert len(as_text) == 12 - 5
    assert as_text.last_position == results[-1].last_position
    # Past the end: no events, and the cursor comes back parsed.
    tail = fresh_store.read_all(after=str(as_text.last_position))
    assert tail.events == [] and tail.last_position == as_text.last_position
    # From the start.
    assert len(fresh_store.read_all(after="0:0", limit=100)) == 12


def test_read_all_empty_log(fresh_store: Store) -> None:
    page = fresh_store.read_all()
    assert page.events == [] and page.last_position is None
    assert len(page) == 0 and list(page) == []


def test_read_all_types_filter(fresh_store: Store) -> None:
    results = fill(fresh_store, streams=6, per_stream=10, batch=5)
    fresh_store.wait_for(results[-1].last_position, timeout=60)
    everything = fresh_store.read_all(limit=1000).events
    paid = [e for e in everything if e.type == "Paid"]
    assert 0 < len(paid) < len(everything)

    filtered = fresh_store.read_all(types=["Paid"], limit=1000)
    assert [e.event_id for e in filtered] == [e.event_id for e in paid]
    both = fresh_store.read_all(types=["Paid", "Added"], limit=1000)
    assert [e.event_id for e in both] == [e.event_id for e in everything]
    assert fresh_store.read_all(types=["Refunded"]).events == []

    # Paging with a filter: pages chain and skip nothing.
    pages: list[RecordedEvent] = []
    after: Position | None = None
    while page := fresh_store.read_all(after=after, limit=7, types=["Paid"]):
        pages.extend(page.events)
        after = page.last_position
    assert [e.event_id for e in pages] == [e.event_id for e in paid]


def test_a_filtered_cursor_moves_past_what_the_filter_skipped(
    fresh_store: Store, fresh_db: str
) -> None:
    """A short filtered page moves its cursor up to the newest event stored below the
    statement's horizon, so the next read does not scan the skipped events again; an open
    transaction's matching event, at or above the horizon, still comes once it commits."""
    first = fresh_store.append("log-1", events_of("Paid", 1))
    noise = fresh_store.append("log-2", events_of("Viewed", 50))
    fresh_store.wait_for(noise.last_position, timeout=60)
    with psycopg.connect(fresh_db) as other:  # not autocommit: the transaction stays open
        held = fresh_store.append("log-3", events_of("Paid", 1), conn=other)
        fresh_store.append("log-2", events_of("Viewed", 5))
        page = fresh_store.read_all(types=["Paid"], limit=10)
        assert [e.stream_id for e in page] == ["log-1"]
        assert page.last_position is not None
        assert page.last_position == noise.last_position
        for category_page in (
            fresh_store.read_category("log", types=["Paid"], after=first.last_position),
            fresh_store.read_all(types=["Paid"], after=first.last_position),
        ):
            assert category_page.events == []
            assert category_page.last_position is not None
            assert category_page.last_position == noise.last_position
        other.commit()
    fresh_store.wait_for(held.last_position, timeout=60)
    after_commit = fresh_store.read_all(types=["Paid"], after=page.last_position)
    assert [(e.stream_id, e.event_id) for e in after_commit] == [
        ("log-3", fresh_store.read_stream("log-3")[0].event_id)
    ]
    # A full page keeps the last event's position: more may match below the horizon.
    full = fresh_store.read_all(types=["Viewed"], limit=3)
    assert full.last_position == full.events[-1].position
    # Transaction ids that ended without storing an event (rolled back, refused) leave
    # the cursor at the newest stored event: after a crash the server may hand those ids
    # out again, to events that must not sort behind the cursor.
    with psycopg.connect(fresh_db) as rolled_back:
        fresh_store.append("log-4", events_of("Viewed", 1), conn=rolled_back)
        rolled_back.rollback()
    with pytest.raises(VersionConflict):
        fresh_store.append("log-1", events_of("Viewed", 1), expected_version=0)
    newest = fresh_store.read_all(limit=1000).events[-1].position
    assert fresh_store.read_all(types=["Nothing"]).last_position == newest
    assert fresh_store.read_category("log", types=["Nothing"]).last_position == newest
    # A cursor the caller gave beyond the horizon never moves back.
    far = Position(2**62, 5)
    assert fresh_store.read_all(types=["Paid"], after=far).last_position == far


def test_read_all_is_per_tenant(fresh_store: Store) -> None:
    other = Store(fresh_store.engine, tenant="acme")
    mine = fresh_store.append("cart-1", events_of("Added", 2))
    theirs = other.append("cart-1", events_of("Added", 3))
    fresh_store.wait_for(max(mine.last_position, theirs.last_position), timeout=60)
    assert {e.tenant for e in fresh_store.read_all()} == {"default"}
    assert len(fresh_store.read_all()) == 2
    assert len(other.read_all()) == 3
    assert len(other.read_category("cart")) == 3


# --- read_category ---------------------------------------------------------------------------


def test_read_category(fresh_store: Store) -> None:
    appended = [
        fresh_store.append("cart-1", events_of("Added", 2)),
        fresh_store.append("cartx-1", events_of("Added", 1)),
        fresh_store.append("cart-2", events_of("Paid", 1)),
        fresh_store.append("order-1", events_of("Paid", 1)),
        fresh_store.append("cart", events_of("Added", 1)),
        fresh_store.append("cart-a-b", events_of("Paid", 2)),
        fresh_store.append("cart-1", events_of("Paid", 1)),
    ]
    fresh_store.wait_for(appended[-1].last_position, timeout=60)

    page = fresh_store.read_category("cart")
    assert [(e.stream_id, e.version) for e in page] == [
        ("cart-1", 1),
        ("cart-1", 2),
        ("cart-2", 1),
        ("cart", 1),
        ("cart-a-b", 1),
        ("cart-a-b", 2),
        ("cart-1", 3),
    ]
    assert page.last_position == appended[-1].last_position
    assert [e.stream_id for e in fresh_store.read_category("cartx")] == ["cartx-1"]
    assert fresh_store.read_category("car").events == []
    state = fresh_store.stream_state("cart-a-b")
    assert state is not None and state.category == "cart"

    # Paging by 2 chains and gives the same sequence.
    paged: list[RecordedEvent] = []
    after: Position | str | None = None
    while chunk := fresh_store.read_category("cart", after=after, limit=2):
        assert len(chunk) <= 2
        paged.extend(chunk.events)
        after = str(chunk.last_position)
    assert [e.event_id for e in paged] == [e.event_id for e in page]

    paid = fresh_store.read_category("cart", types=["Paid"])
    assert [(e.stream_id, e.version) for e in paid] == [
        ("cart-2", 1),
        ("cart-a-b", 1),
        ("cart-a-b", 2),
        ("cart-1", 3),
    ]
    first_paid = fresh_store.read_category("cart", types=["Paid"], limit=1)
    rest = fresh_store.read_category("cart", types=["Paid"], after=first_paid.last_position)
    assert [e.event_id for e in first_paid.events + rest.events] == [e.event_id for e in paid]


# --- the watermark ---------------------------------------------------------------------------


def test_open_transaction_hides_itself_and_everything_after(
    fresh_store: Store, fresh_db: str
) -> None:
    before = fresh_store.append("w-1", events_of("Added", 1))
    fresh_store.wait_for(before.last_position, timeout=60)

    with psycopg.connect(fresh_db) as other:  # not autocommit: the transaction stays open
        held = fresh_store.append("w-2", events_of("Added", 2), conn=other)
        later = fresh_store.append("w-3", events_of("Added", 1))  # commits at once
        assert later.first_position.tx > held.first_position.tx
        assert later.first_position.pos > held.last_position.pos

        page = fresh_store.read_all()
        assert [e.stream_id for e in page] == ["w-1"]
        assert fresh_store.read_all(after=before.last_position).events == []
        assert [e.stream_id for e in fresh_store.read_category("w")] == ["w-1"]
        # A filtered read's cursor moves past what it scanned, never into the open one.
        filtered = fresh_store.read_all(types=["Added"])
        assert filtered.last_position is not None
        assert before.last_position <= filtered.last_position < Position(held.first_position.tx, 0)
        # The committed later event exists, it is just not tailable yet.
        assert len(fresh_store.read_stream("w-3")) == 1
        assert fresh_store.read_stream("w-2") == []
        other.commit()

    fresh_store.wait_for(later.last_position, timeout=60)
    tail = fresh_store.read_all(after=before.last_position)
    # Commit order was w-3 then w-2, but (tx, pos) order puts w-2 first, and a reader
    # that tails by cursor sees both, skipping nothing.
    assert [(e.stream_id, e.version) for e in tail] == [("w-2", 1), ("w-2", 2), ("w-3", 1)]
    assert tail.last_position == later.last_position


def test_rolled_back_transaction_leaves_no_trace(fresh_store: Store, fresh_db: str) -> None:
    with psycopg.connect(fresh_db) as other:
        fresh_store.append("r-1", events_of("Added", 1), conn=other)
        other.rollback()
    after = fresh_store.append("r-2", events_of("Added", 1))
    fresh_store.wait_for(after.last_position, timeout=60)
    assert [e.stream_id for e in fresh_store.read_all()] == ["r-2"]
    assert fresh_store.stream_state("r-1") is None


def test_event_ids_round_trip(store: Store, conn: Connection) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    store.append("ids-1", [NewEvent(type="T", event_id=event_id) for event_id in ids], conn=conn)
    assert [e.event_id for e in store.read_stream("ids-1", conn=conn)] == ids
