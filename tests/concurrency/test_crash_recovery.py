"""After a crash. A durable server (fsync and synchronous commit on) stopped the way a
crash stops it: transaction ids that ended without a durable record (rolled back, or an
append refused) are handed out again after recovery, so no reader's cursor may have moved
past them."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import create_engine

from pgstate import NewEvent, Store, VersionConflict
from pgstate._connect import psycopg_url
from pgstate._embedded import EmbeddedPostgres
from pgstate.migrate import upgrade


def test_a_filtered_cursor_is_not_passed_by_ids_a_crash_hands_out_again() -> None:
    server = EmbeddedPostgres(durable=True).start()
    try:
        url = server.url()
        engine = create_engine(psycopg_url(url))
        upgrade(engine)
        engine.dispose()
        with Store(url) as store:
            store.append("s-1", [NewEvent(type="X")])
            cursor = store.read_all(types=["X"]).last_position
            with psycopg.connect(url) as rolled_back:
                for _ in range(3):
                    store.append("s-2", [NewEvent(type="X")], conn=rolled_back)
                    rolled_back.rollback()
            with pytest.raises(VersionConflict):
                store.append("s-1", [NewEvent(type="X")], expected_version=0)
            cursor = store.read_all(types=["X"], after=cursor).last_position
        server.crash_restart()
        with Store(url) as store:
            written = store.append("s-3", [NewEvent(type="X")])
            store.wait_for(written.last_position, timeout=30)
            assert [e.stream_id for e in store.read_all(types=["X"], after=cursor)] == ["s-3"]
            assert [e.stream_id for e in store.read_all()] == ["s-1", "s-3"]
    finally:
        server.stop()
