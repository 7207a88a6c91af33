"""The listener never misses an event: concurrent writer processes, transactions that take
a position and commit late, both notification modes, a killed connection, and a stall
report for an idle transaction holding the horizon. Woken by the server's log stream, it
delivers every event promptly with no NOTIFY anywhere and no poll to fall back on, the
stream never poses as a synchronous standby, and a server that refuses the stream leaves
LISTEN and polling in charge."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from sqlalchemy import make_url

from pgstate import NewEvent, Store
from pgstate._connect import libpq_dsn
from pgstate.listen import Listener, Relay, Stall, WalDoorbell, open_doorbell, set_notify_mode
from pgstate.models import RecordedEvent

pytestmark = pytest.mark.committing

WRITERS = 4
PER_WRITER = 150


def writer(dsn: str, number: int, acks: Any) -> None:
    """Append events; about one in five stays open a while after taking its position."""
    rng = random.Random(number)
    store = Store(dsn)
    acked = []
    with psycopg.connect(libpq_dsn(dsn)) as conn:
        for index in range(PER_WRITER):
            stream = f"w{number}-{index % 5}"
            result = store.append(stream, [NewEvent(type="Wrote", data={"i": index})], conn=conn)
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.001, 0.02))  # commits late, after later positions
            conn.commit()
            acked.append((stream, result.version))
    store.close()
    acks.put(acked)


def run_writers(dsn: str) -> list[tuple[str, int]]:
    context = multiprocessing.get_context("spawn")
    acks = context.Queue()
    processes = [context.Process(target=writer, args=(dsn, n, acks)) for n in range(WRITERS)]
    for process in processes:
        process.start()
    acknowledged = [item for _ in processes for item in acks.get(timeout=120)]
    for process in processes:
        process.join(timeout=30)
    return acknowledged


def collect(listener: Listener, expected: int, delivered: list[RecordedEvent]) -> threading.Thread:
    deadline = time.monotonic() + 120

    def body() -> None:
        for event in listener.events(
            should_stop=lambda: len(delivered) >= expected or time.monotonic() > deadline
        ):
            delivered.append(event)
            if len(delivered) >= expected:
                break

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def check_delivery(acknowledged: list[tuple[str, int]], delivered: list[RecordedEvent]) -> None:
    keys = [(e.stream_id, e.version) for e in delivered]
    assert len(keys) == len(set(keys)), "an event was delivered twice"
    assert set(keys) == set(acknowledged), "an acknowledged event was missed"
    positions = [e.position for e in delivered]
    assert positions == sorted(positions)
    per_stream: dict[str, list[int]] = defaultdict(list)
    for event in delivered:
        per_stream[event.stream_id].append(event.version)
    for versions in per_stream.values():
        assert versions == list(range(1, len(versions) + 1))


@pytest.mark.parametrize("mode", ["commit", "relay"])
def test_listener_delivers_every_event_once(fresh_db: str, mode: str) -> None:
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        set_notify_mode(conn, mode)
    stop_relay = threading.Event()
    relay_thread = None
    if mode == "relay":
        relay = Relay(fresh_db, interval=0.002)
        relay_thread = threading.Thread(target=relay.run, args=(stop_relay.is_set,))
        relay_thread.start()
    listener = Listener(fresh_db, poll_interval=1.0)
    delivered: list[RecordedEvent] = []
    thread = collect(listener, WRITERS * PER_WRITER, delivered)
    acknowledged = run_writers(fresh_db)
    thread.join(timeout=120)
    stop_relay.set()
    if relay_thread is not None:
        relay_thread.join()
    listener.close()
    assert len(acknowledged) == WRITERS * PER_WRITER
    check_delivery(acknowledged, delivered)
    if relay_thread is not None:
        # The relay signalled (it saw the head move), never past what was delivered.
        assert relay.notified is not None
        assert relay.notified <= delivered[-1].position


def test_listener_recovers_from_killed_connection(fresh_db: str) -> None:
    store = Store(fresh_db)
    listener = Listener(fresh_db, poll_interval=0.05, reconnect_delay=0.01)
    delivered: list[RecordedEvent] = []
    total = 300
    thread = collect(listener, total, delivered)
    acknowledged = []
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as admin:
        for index in range(total):
            result = store.append(f"k-{index % 7}", [NewEvent(type="K", data={"i": index})])
            acknowledged.append((f"k-{index % 7}", result.version))
            if index in (100, 200):
                conn = listener.conn
                assert conn is not None
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    thread.join(timeout=60)
    listener.close()
    store.close()
    assert listener.reconnects >= 1
    check_delivery(acknowledged, delivered)


def test_idle_transaction_is_reported_as_stall(fresh_db: str) -> None:
    store = Store(fresh_db)
    stalls: list[Stall] = []
    listener = Listener(
        fresh_db,
        poll_interval=0.05,
        stall_after=timedelta(milliseconds=100),
        on_stall=stalls.append,
    )
    with psycopg.connect(libpq_dsn(fresh_db)) as idle:
        store.append("held-1", [NewEvent(type="Held")], conn=idle)  # open, not committed
        idle_pid = idle.info.backend_pid
        store.append("free-1", [NewEvent(type="Free")])  # committed, but behind the horizon
        delivered: list[RecordedEvent] = []
        deadline = time.monotonic() + 10
        for event in listener.events(
            should_stop=lambda: bool(stalls) or time.monotonic() > deadline
        ):
            delivered.append(event)
        assert delivered == []  # nothing is skipped past the open transaction
        assert stalls, "the stall was not reported"
        stall = stalls[0]
        assert stall.pid == idle_pid
        assert stall.state == "idle in transaction"
        assert stall.held_events == 1
        idle.commit()
    listener.stall_after = timedelta(hours=1)
    got: list[RecordedEvent] = []
    deadline = time.monotonic() + 10
    for event in listener.events(should_stop=lambda: len(got) == 2 or time.monotonic() > deadline):
        got.append(event)
    assert [e.stream_id for e in got] == ["held-1", "free-1"]
    listener.close()
    store.close()


def test_polling_only_listener_for_transaction_poolers(fresh_db: str) -> None:
    """use_listen=False never issues LISTEN (which transaction-mode poolers break) and
    still delivers everything, by polling."""
    store = Store(fresh_db)
    listener = Listener(fresh_db, use_listen=False, poll_interval=0.01)
    acknowledged = [
        (f"p-{n % 3}", store.append(f"p-{n % 3}", [NewEvent(type="P")]).version) for n in range(30)
    ]
    delivered: list[RecordedEvent] = []
    deadline = time.monotonic() + 10
    for event in listener.events(
        should_stop=lambda: len(delivered) >= 30 or time.monotonic() > deadline
    ):
        delivered.append(event)
    assert listener.conn is not None
    listening = listener.conn.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()
    assert listening == (0,)
    listener.close()
    store.close()
    check_delivery(acknowledged, delivered)


def test_a_filtered_listener_moves_past_what_it_skips_and_misses_nothing(fresh_db: str) -> None:
    """With types, the listener's position moves up to the newest event the filter skips
    (the next poll does not scan them again), and a matching event committed later, by a
    transaction that was open meanwhile, is still delivered once."""
    store = Store(fresh_db)
    listener = Listener(fresh_db, types=["Paid"], poll_interval=0.01)
    store.append("pay-1", [NewEvent(type="Paid")])
    noise = store.append("view-1", [NewEvent(type="Viewed") for _ in range(40)])
    delivered: list[RecordedEvent] = []
    deadline = time.monotonic() + 10

    def moved_to(position: Any) -> Callable[[], bool]:
        return lambda: (
            (listener.position is not None and listener.position >= position)
            or time.monotonic() > deadline
        )

    with psycopg.connect(libpq_dsn(fresh_db)) as other:
        held = store.append("pay-2", [NewEvent(type="Paid")], conn=other)
        delivered.extend(listener.events(should_stop=moved_to(noise.last_position)))
        assert [event.stream_id for event in delivered] == ["pay-1"]
        assert listener.position is not None
        assert listener.position == noise.last_position < held.first_position
        other.commit()
    late = store.append("pay-3", [NewEvent(type="Paid")])
    delivered.extend(listener.events(should_stop=moved_to(late.first_position)))
    assert [event.stream_id for event in delivered] == ["pay-1", "pay-2", "pay-3"]
    listener.close()
    store.close()


NO_REPLICATION_ROLE = "pgstate_test_no_replication"


@pytest.fixture
def log_stream(fresh_db: str) -> str:
    """The database, where the server allows this user a replication connection."""
    doorbell, refusal = open_doorbell(fresh_db)
    if doorbell is None:
        pytest.skip(f"the server refuses a replication connection: {refusal}")
    doorbell.close()
    return fresh_db


def test_listener_woken_by_the_log_misses_nothing(log_stream: str) -> None:
    with psycopg.connect(libpq_dsn(log_stream), autocommit=True) as conn:
        set_notify_mode(conn, "relay")  # writers never notify, and no relay runs
    # A poll a minute apart: only the log stream can deliver within the test's deadline.
    listener = Listener(log_stream, poll_interval=60.0, wal_wakeups=True)
    delivered: list[RecordedEvent] = []
    expected = WRITERS * PER_WRITER
    finished = threading.Event()

    def consume() -> None:
        for event in listener.events(should_stop=finished.is_set):
            delivered.append(event)
            if len(delivered) >= expected:
                finished.set()
                break

    consumer = threading.Thread(target=consume)
    consumer.start()
    acknowledged = run_writers(log_stream)
    caught_up = finished.wait(timeout=20)
    finished.set()
    consumer.join(timeout=70)
    doorbell = listener.doorbell
    listener.close()
    assert caught_up, f"{len(delivered)} of {expected} events within 20 s of the last commit"
    assert listener.refusal is None
    assert doorbell is not None and doorbell.rings > 0
    check_delivery(acknowledged, delivered)


def consume_in_thread(
    listener: Listener, count: int, delivered: list[RecordedEvent]
) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """Collects events into ``delivered`` until ``count`` have come; returns the thread, an
    event set at each delivery and one set when all have come."""
    arrived, finished = threading.Event(), threading.Event()

    def body() -> None:
        for event in listener.events():
            delivered.append(event)
            arrived.set()
            if len(delivered) >= count:
                finished.set()
                break

    thread = threading.Thread(target=body)
    thread.start()
    return thread, arrived, finished


def test_a_single_commit_is_delivered_without_a_poll(log_stream: str) -> None:
    """One commit at a time, each after the last was delivered (the listener back on the
    stream): each wakes the listener, with a minute-long poll as the only other way."""
    store = Store(log_stream)
    listener = Listener(log_stream, poll_interval=60.0, wal_wakeups=True)
    delivered: list[RecordedEvent] = []
    consumer, arrived, _ = consume_in_thread(listener, 2, delivered)
    try:
        for number in (1, 2):
            arrived.clear()
            store.append(f"quiet-{number}", [NewEvent(type="Said", data={"n": number})])
            assert arrived.wait(timeout=10), f"commit {number} not delivered within 10 s"
    finally:
        consumer.join(timeout=70)
        listener.close()
        store.close()
    assert [(e.stream_id, e.version) for e in delivered] == [("quiet-1", 1), ("quiet-2", 1)]


def test_a_killed_log_stream_is_reopened_and_nothing_is_lost(log_stream: str) -> None:
    store = Store(log_stream)
    listener = Listener(log_stream, poll_interval=60.0, wal_wakeups=True, reconnect_delay=0.01)
    delivered: list[RecordedEvent] = []
    consumer, arrived, done = consume_in_thread(listener, 3, delivered)
    try:
        with psycopg.connect(libpq_dsn(log_stream), autocommit=True) as admin:
            store.append("killed-stream", [NewEvent(type="Said", data={"n": 0})])
            # Delivered: the listener holds its stream, and is waiting on it again.
            assert arrived.wait(timeout=10)
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_replication"
                " WHERE application_name = 'pgstate'"
            ).fetchall()
            assert killed == [(True,)]
            for number in (1, 2):
                store.append("killed-stream", [NewEvent(type="Said", data={"n": number})])
        assert done.wait(timeout=10), f"{len(delivered)} of 3 delivered within 10 s"
    finally:
        consumer.join(timeout=70)
        listener.close()
        store.close()
    assert listener.reconnects >= 1
    assert [e.version for e in delivered] == [1, 2, 3]


def test_relay_woken_by_the_log_notifies_without_a_poll(log_stream: str) -> None:
    # A fallback poll a minute apart: only the log stream can notify within the deadline.
    relay = Relay(log_stream, wake="wal", fallback=60.0)
    connected = threading.Event()
    stop_relay = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop_relay.is_set, connected.set))
    relay_thread.start()
    store = Store(log_stream)
    try:
        with psycopg.connect(libpq_dsn(log_stream), autocommit=True) as conn:
            conn.execute("LISTEN pgstate_events")
            assert connected.wait(timeout=10)
            result = store.append("rung-1", [NewEvent(type="Said", data={})])
            payloads = [n.payload for n in conn.notifies(timeout=10.0, stop_after=1)]
    finally:
        stop_relay.set()
        store.append("rung-2", [NewEvent(type="Said", data={})])  # rings: the relay stops
        relay_thread.join(timeout=70)
        store.close()
    assert relay.waking == "wal"
    assert payloads == [str(result.last_position)]


def test_the_stream_answers_keepalives_and_is_never_a_synchronous_standby(
    log_stream: str,
) -> None:
    doorbell = WalDoorbell(log_stream)
    # The server asks for a reply every half second and drops a silent stream after one.
    doorbell.conninfo = make_conninfo(doorbell.conninfo, options="-c wal_sender_timeout=1000")
    doorbell.open()
    try:
        with psycopg.connect(libpq_dsn(log_stream), autocommit=True) as conn:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                doorbell.wait(0.1)
            row = conn.execute(
                "SELECT write_lsn, flush_lsn, replay_lsn, reply_time, sync_state"
                " FROM pg_stat_replication WHERE application_name = 'pgstate'"
            ).fetchone()
    finally:
        doorbell.close()
    assert row is not None, "the stream was dropped: keepalive requests went unanswered"
    write_lsn, flush_lsn, replay_lsn, reply_time, sync_state = row
    assert reply_time is not None, "no reply was ever sent"
    # No valid flush position: the server never picks it as a synchronous standby.
    assert (write_lsn, flush_lsn, replay_lsn) == (None, None, None)
    assert sync_state == "async"


@pytest.fixture
def no_replication_dsn(fresh_db: str) -> Iterator[str]:
    """The same database as a login role without the REPLICATION attribute."""
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not (row := superuser.fetchone()) or not row[0]:
            pytest.skip("creating a role needs a superuser")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (NO_REPLICATION_ROLE,))
        if exists.fetchone() is None:
            conn.execute(f"CREATE ROLE {NO_REPLICATION_ROLE} LOGIN NOREPLICATION")
        conn.execute(f"GRANT pgstate_writer TO {NO_REPLICATION_ROLE}")
    yield make_url(fresh_db).set(username=NO_REPLICATION_ROLE).render_as_string(False)


def test_a_refused_stream_leaves_listen_and_polling_in_charge(no_replication_dsn: str) -> None:
    doorbell, refusal = open_doorbell(no_replication_dsn)
    assert doorbell is None and refusal
    relay = Relay(no_replication_dsn, wake="auto", interval=0.002)
    stop_relay = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop_relay.is_set,))
    relay_thread.start()
    listener = Listener(no_replication_dsn, poll_interval=60.0, wal_wakeups=True)
    store = Store(no_replication_dsn)
    delivered: list[RecordedEvent] = []
    consumer, arrived, _ = consume_in_thread(listener, 2, delivered)
    try:
        for number in (1, 2):
            arrived.clear()
            store.append(f"fallback-{number}", [NewEvent(type="Said", data={})])
            # The second comes after the listener is on LISTEN: the relay's poll and its
            # NOTIFY deliver it, not the minute-long poll.
            assert arrived.wait(timeout=10)
    finally:
        stop_relay.set()
        relay_thread.join(timeout=10)
        consumer.join(timeout=70)
        listener.close()
        store.close()
    assert relay.waking == "poll" and relay.refusal
    assert listener.doorbell is None and listener.refusal
    assert [e.stream_id for e in delivered] == ["fallback-1", "fallback-2"]


class _Recorded(logging.Handler):
    """Keeps the records it is given and signals the first."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.first.set()


def test_a_relay_told_to_wake_on_the_log_alone_says_why_it_cannot(
    no_replication_dsn: str,
) -> None:
    relay = Relay(no_replication_dsn, wake="wal")
    recorded = _Recorded()
    logger = logging.getLogger("pgstate.listen")
    logger.addHandler(recorded)
    connected = threading.Event()
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, args=(stop.is_set, connected.set))
    runner.start()
    try:
        assert recorded.first.wait(timeout=10)
    finally:
        stop.set()
        runner.join(timeout=10)
        logger.removeHandler(recorded)
    assert not runner.is_alive()
    # It neither claims to be connected nor falls back to polling on its own.
    assert not connected.is_set() and relay.waking is None and relay.steps == 0
    [first, *_] = recorded.records
    assert "refuses the log stream" in first.getMessage()
    assert relay.refusal and relay.refusal in first.getMessage()
    # The same refusal is reported once, not at every retry.
    assert len({record.getMessage() for record in recorded.records}) == len(recorded.records)


def test_a_relay_started_before_the_migration_waits_for_it(
    pgstate_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker may start before `pgstate migrate` has run: its relay warns and keeps
    trying, then notifies once the schema is there (it used to die with its thread)."""
    from sqlalchemy import create_engine

    from pgstate._connect import psycopg_url
    from pgstate.migrate import upgrade
    from pgstate.testing import cloned_database

    with cloned_database(pgstate_server, "template0") as url:
        relay = Relay(url, interval=0.005)
        stop_relay = threading.Event()
        with caplog.at_level(logging.WARNING, logger="pgstate.listen"):
            relay_thread = threading.Thread(target=relay.run, args=(stop_relay.is_set,))
            relay_thread.start()
            try:
                deadline = time.monotonic() + 10
                while not any("does not exist" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "no warning about the missing schema"
                    stop_relay.wait(0.01)
                engine = create_engine(psycopg_url(url))
                upgrade(engine)
                engine.dispose()
                with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
                    conn.execute("LISTEN pgstate_events")
                    with Store(url) as store:
                        result = store.append("late-1", [NewEvent(type="Said")])
                    payloads = [n.payload for n in conn.notifies(timeout=10.0, stop_after=1)]
            finally:
                stop_relay.set()
                relay_thread.join(timeout=10)
        assert not relay_thread.is_alive()
        assert payloads == [str(result.last_position)]


def test_a_commit_right_after_a_read_still_wakes_the_listener(fresh_db: str) -> None:
    """Notifications already queued are dropped before a read, never after it: one for a
    commit that lands between the read and the wait must wake that wait, or its event
    would wait a whole poll interval (a minute here, far beyond the test's deadline)."""
    store = Store(fresh_db)
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        set_notify_mode(conn, "commit")
    early = store.append("early-1", [NewEvent(type="Said")])
    store.wait_for(early.last_position)
    committed_after_read: list[str] = []

    class CommitAfterFirstRead(Listener):
        def _read_page(self, conn: psycopg.Connection[Any]) -> Any:
            page = super()._read_page(conn)
            if not committed_after_read:
                result = store.append("late-1", [NewEvent(type="Said")])
                committed_after_read.append(str(result.last_position))
                conn.execute("SELECT 1")  # its notification reaches this connection now
            return page

    listener = CommitAfterFirstRead(fresh_db, poll_interval=60.0)
    deadline = time.monotonic() + 20
    delivered: list[RecordedEvent] = []
    for event in listener.events(
        should_stop=lambda: len(delivered) >= 2 or time.monotonic() > deadline
    ):
        delivered.append(event)
    listener.close()
    store.close()
    assert [str(event.position) for event in delivered] == [
        str(early.last_position),
        *committed_after_read,
    ]


def listening_channels(listener: Listener) -> list[str]:
    assert listener.conn is not None
    return [row[0] for row in listener.conn.execute("SELECT pg_listening_channels()")]


def test_a_listener_between_iterations_holds_no_notifications_back(fresh_db: str) -> None:
    """The server keeps a notification until every listening session has read it, so a
    listener that is not being iterated stops listening (an idle one would hold the queue
    back for every writer); the next iteration listens again and misses nothing."""
    with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
        set_notify_mode(conn, "commit")
    store = Store(fresh_db)
    listener = Listener(fresh_db, poll_interval=0.05)
    try:
        store.append("q-1", [NewEvent(type="First")])
        seen: list[str] = []
        for event in listener.events():
            seen.append(event.stream_id)
            assert listening_channels(listener) == ["pgstate_events"]
            break
        assert listening_channels(listener) == []
        written = [store.append(f"q-{n}", [NewEvent(type="Later")]) for n in range(2, 6)]
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            queued = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
        assert queued == (0.0,)
        last = written[-1].last_position
        for event in listener.events(should_stop=lambda: listener.position == last):
            seen.append(event.stream_id)
        assert seen == ["q-1", "q-2", "q-3", "q-4", "q-5"]
    finally:
        listener.close()
        store.close()
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            set_notify_mode(conn, "relay")


def test_a_closed_doorbell_keeps_no_file_descriptor(log_stream: str) -> None:
    gc.disable()  # a descriptor held by a reference cycle would wait for the collector
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            doorbell, refusal = open_doorbell(log_stream)
            assert doorbell is not None, refusal
            doorbell.close()
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        gc.enable()


def wait_until_running(dsn: str, function: str) -> None:
    """Until another session of the database is running a call of ``function``."""
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        for _ in range(1000):
            running = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE %s",
                (f"%{function}%",),
            ).fetchone()
            if running and running[0]:
                return
            time.sleep(0.01)
    raise AssertionError(f"no session ran {function}")


def test_switching_the_notify_mode_never_holds_appends_back(fresh_db: str) -> None:
    """While a transaction that wrote the log stays open, a mode switch waits for it
    without queueing for the table lock, so other appends go on; it switches once the
    transaction ends."""
    store = Store(fresh_db)
    switched = threading.Event()
    failures: list[BaseException] = []

    def switch() -> None:
        try:
            with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
                set_notify_mode(conn, "commit")
            switched.set()
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    try:
        with psycopg.connect(libpq_dsn(fresh_db)) as open_writer:
            store.append("open-1", [NewEvent(type="Held")], conn=open_writer)
            switcher = threading.Thread(target=switch)
            switcher.start()
            wait_until_running(fresh_db, "set_notify_mode_v1")
            # A queued ALTER TABLE would hold these back until their lock timeout
            # (LockTimeout); taken with NOWAIT, it leaves them free.
            for n in range(5):
                store.append(f"free-{n}", [NewEvent(type="Free")])
            assert not switched.is_set()
            open_writer.commit()
        switcher.join(10)
        assert failures == [] and switched.is_set()
        with psycopg.connect(libpq_dsn(fresh_db)) as conn:
            mode = conn.execute("SELECT value FROM pgstate.config WHERE key = 'notify_mode'")
            assert mode.fetchone() == ("commit",)
    finally:
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as conn:
            set_notify_mode(conn, "relay")
        store.close()
