"""After a crash. A durable server (fsync and synchronous commit on) stopped the way a
crash stops it: transaction ids that ended without a durable record (rolled back, or an
append refused) are handed out again after recovery, so no reader's cursor may have moved
past them."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import create_engine

from pgstate import NewEvent, PositionNotInLog, Store, VersionConflict
from pgstate._connect import psycopg_url
from pgstate._embedded import EmbeddedPostgres
from pgstate.listen import Listener
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


def test_a_listener_stops_when_a_crash_took_back_events_it_handed_out() -> None:
    """Commits made with synchronous_commit off are visible before their log is written;
    a crash then takes them back, and the listener that already handed them out must not
    read on from a cursor past them. The log writer is slowed so the crash comes first;
    should it still write an attempt's commit in time, the next attempt tries again."""
    server = EmbeddedPostgres(durable=True, settings={"wal_writer_delay": "10s"}).start()
    try:
        url = server.url()
        engine = create_engine(psycopg_url(url))
        upgrade(engine)
        engine.dispose()
        lost = None
        listener = Listener(url, poll_interval=0.01)
        for attempt in range(5):
            with Store(url) as store, psycopg.connect(url, autocommit=True) as writer:
                store.append(f"kept-{attempt}", [NewEvent(type="Kept")])
                writer.execute("SET synchronous_commit = off")
                unsure = store.append(f"unsure-{attempt}", [NewEvent(type="Unsure")], conn=writer)
                seen: list[str] = []
                while listener.position != unsure.last_position:
                    seen += [e.stream_id for e in next(listener.batches())]
                assert seen[-1] == f"unsure-{attempt}"
            server.crash_restart()
            with Store(url) as store:
                if store.stream_state(f"unsure-{attempt}") is None:
                    lost = unsure.last_position
                    break
        assert lost is not None, "the log writer saved every attempt's commit"
        # It reconnects, then checks its cursor. Bounded: a listener that accepted the
        # cursor would wait for events forever.
        deadline = time.monotonic() + 10
        with pytest.raises(PositionNotInLog) as refused:
            list(listener.batches(lambda: time.monotonic() > deadline))
        assert refused.value.position == lost
        listener.close()
    finally:
        server.stop()
