"""The race that breaks a reader tailing by ``pos > last``: a transaction takes a lower
position, a later one commits first, the reader moves past, and the first then commits.
The naive reader skips it; pgstate's reader neither skips nor duplicates it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgstate import NewEvent, Store
from pgstate._connect import libpq_dsn
from pgstate.models import RecordedEvent

pytestmark = pytest.mark.committing

# What a tailing reader by sequence number does; pgstate does not read this way.
NAIVE_TAIL = "SELECT pos, stream_id FROM pgstate.events WHERE pos > %s ORDER BY pos"


def test_late_commit_is_skipped_by_pos_reader_but_not_by_pgstate(fresh_db: str) -> None:
    store = Store(fresh_db)
    dsn = libpq_dsn(fresh_db)
    with (
        psycopg.connect(dsn) as slow,
        psycopg.connect(dsn) as fast,
        psycopg.connect(dsn, autocommit=True) as reader,
    ):
        early = store.append("slow-1", [NewEvent(type="Early")], conn=slow)  # not committed
        late = store.append("fast-1", [NewEvent(type="Late")], conn=fast)
        fast.commit()
        assert early.first_position.pos < late.first_position.pos

        # The naive reader sees the later row and moves its cursor past the earlier one.
        naive_rows: list[tuple[Any, ...]] = reader.execute(NAIVE_TAIL, (0,)).fetchall()
        assert [r[1] for r in naive_rows] == ["fast-1"]
        naive_cursor = naive_rows[-1][0]
        # pgstate's reader sees nothing yet: the open transaction holds the watermark.
        first_page = store.read_all(after=None, conn=reader)
        assert first_page.events == []

        slow.commit()
        naive_next = reader.execute(NAIVE_TAIL, (naive_cursor,)).fetchall()
        assert naive_next == [], "the naive reader skipped the late-committing event"

        delivered: list[RecordedEvent] = []
        after = first_page.last_position
        for _ in range(3):
            page = store.read_all(after=after, limit=1, conn=reader)
            delivered.extend(page.events)
            after = page.last_position
        assert [e.stream_id for e in delivered] == ["slow-1", "fast-1"]
        assert [e.position for e in delivered] == [early.first_position, late.first_position]
    store.close()


def test_older_transaction_cannot_write_after_a_newer_one(fresh_db: str) -> None:
    """A transaction that got its id (by writing elsewhere) before the stream's last writer
    would sort its event before that writer's: it is refused as a transient conflict."""
    from pgstate import SerializationFailure

    store = Store(fresh_db)
    store.append("order-1", [NewEvent(type="Placed")])
    with psycopg.connect(libpq_dsn(fresh_db)) as older:
        older.execute("CREATE TABLE outbox (note text)")
        older.commit()
        older.execute("INSERT INTO outbox VALUES ('first')")  # takes a transaction id now
        store.append("order-1", [NewEvent(type="Paid")])  # a newer transaction, committed
        with pytest.raises(SerializationFailure) as caught:
            store.append("order-1", [NewEvent(type="Shipped")], conn=older)
        assert caught.value.retryable and caught.value.current_version == 2
        older.rollback()
        # The retry runs in a new transaction, which sorts after every stored event.
        older.execute("INSERT INTO outbox VALUES ('retry')")
        store.append("order-1", [NewEvent(type="Shipped")], conn=older)
        older.commit()
    page = store.read_all()
    assert [(e.version, e.type) for e in page.events] == [
        (1, "Placed"),
        (2, "Paid"),
        (3, "Shipped"),
    ]
    store.close()
