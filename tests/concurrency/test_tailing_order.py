"""Per-stream order for tailing readers when a writer's transaction is older than the
stream's last writer (the commit-order race itself is in test_commit_order.py)."""

from __future__ import annotations

import psycopg
import pytest

from pgstate import NewEvent, Store
from pgstate._connect import libpq_dsn

pytestmark = pytest.mark.committing


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
