"""Tailing the log: a listener that never misses an event, and the relay that keeps NOTIFY
off the writers' commit path.

A listener owns an autocommit connection. It LISTENs first, then catches up from its
position, then waits for a notification or a poll timeout, whichever comes first, and
catches up again. A notification is only a hint to look now: the events always come from
the table, read in commit order below the watermark, so a lost notification delays an event
by at most one poll interval and a dropped connection loses nothing (it catches up again
after reconnecting). With ``use_listen=False`` it only polls, for poolers in transaction
mode where LISTEN does not work.
"""

from __future__ import annotations

import logging
import selectors
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from pgstate import _ops
from pgstate._connect import libpq_dsn
from pgstate._driver import _drive, _prepare_adapters
from pgstate._sql import query
from pgstate.errors import translate
from pgstate.models import Page, Position, RecordedEvent

log = logging.getLogger(__name__)

CHANNEL = "pgstate_events"


@dataclass(frozen=True, slots=True)
class Stall:
    """Committed events are held back from readers by an older open transaction."""

    held_events: int
    held_since: datetime
    pid: int | None
    state: str | None
    xact_start: datetime | None
    open_for: timedelta | None
    query: str | None


def check_stall(conn: psycopg.Connection[Any], threshold: timedelta) -> Stall | None:
    """A :class:`Stall` if committed events have waited behind the watermark for longer
    than ``threshold``, naming the session that holds it."""
    row = conn.execute(query("held_back")).fetchone()
    if row is None or not row[0]:
        return None
    held, since = row
    now_row = conn.execute(query("clock")).fetchone()
    assert now_row is not None
    if now_row[0] - since < threshold:
        return None
    holder = conn.execute(query("horizon_holder")).fetchone()
    pid, state, xact_start, open_for, text = holder if holder else (None,) * 5
    return Stall(held, since, pid, state, xact_start, open_for, text)


class Listener:
    """Yields every committed event after ``after``, in commit order, exactly once, for as
    long as you iterate. ``position`` is the last event handed out."""

    def __init__(
        self,
        dsn: str,
        *,
        after: Position | None = None,
        tenant: str = "default",
        types: Sequence[str] | None = None,
        use_listen: bool = True,
        poll_interval: float = 0.5,
        page_size: int = 1000,
        stall_after: timedelta = timedelta(seconds=30),
        on_stall: Callable[[Stall], None] | None = None,
        reconnect_delay: float = 0.1,
        wal_wakeups: bool = False,
    ) -> None:
        _ops.check_interval(poll_interval, "poll_interval")
        self.dsn = libpq_dsn(dsn)
        self.wal_wakeups = wal_wakeups
        self.doorbell: WalDoorbell | None = None
        self.refusal: str | None = None  # why the server refused the log stream, if it did
        self.position = after
        self.tenant = tenant
        self.types = list(types) if types is not None else None
        self.use_listen = use_listen
        self.poll_interval = poll_interval
        self.page_size = page_size
        self.stall_after = stall_after
        self.on_stall = on_stall
        self.reconnect_delay = reconnect_delay
        self.reconnects = 0
        self.conn: psycopg.Connection[Any] | None = None
        self._listening = False
        self._last_stall_check = 0.0

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True)
        try:
            _prepare_adapters(conn.adapters)
            if self.wal_wakeups:
                # Opened before catching up, as LISTEN is: a commit meanwhile still rings.
                self.doorbell, self.refusal = open_doorbell(self.dsn)
                if self.doorbell is not None:
                    return conn
            if self.use_listen:
                # LISTEN before catching up: a commit during the catch-up still wakes us.
                conn.execute(query("listen"))
                self._listening = True
        except BaseException:
            conn.close()  # not yet self.conn: close() would not find it
            raise
        return conn

    def _listen_again(self, conn: psycopg.Connection[Any]) -> None:
        # After an iteration ended (see _stop_listening), before the catch-up read.
        if self.use_listen and self.doorbell is None and not self._listening:
            conn.execute(query("listen"))
            self._listening = True

    def _stop_listening(self) -> None:
        """When an iteration ends, the connection stops listening: the server keeps every
        notification until each listener has read it, so an idle listener would hold the
        queue back for every writer (with writers notifying, a full queue fails their
        commits). The next iteration listens again before it catches up."""
        conn = self.conn
        if conn is None or not self._listening:
            return
        self._listening = False
        try:
            conn.execute(query("unlisten"))
        except psycopg.Error:
            self.close()

    def _read_page(self, conn: psycopg.Connection[Any]) -> Page:
        op = _ops.read_all(self.tenant, self.position, self.page_size, self.types)
        # Untranslated errors: a broken connection stays an OperationalError, which
        # reconnects.
        page: Page = _drive(conn, op)
        return page

    def _wait(self, conn: psycopg.Connection[Any], timeout: float, found: bool) -> None:
        if self.doorbell is not None:
            self.doorbell.pace(found, timeout)
        elif self.use_listen:
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        else:
            time.sleep(timeout)

    def _drain_notifications(self, conn: psycopg.Connection[Any]) -> None:
        # The page about to be read covers every notification already here; left alone
        # they would pile up for as long as the reader is busy catching up.
        if self.doorbell is None and self.use_listen:
            for _ in conn.notifies(timeout=0):
                pass

    def _maybe_report_stall(self, conn: psycopg.Connection[Any]) -> None:
        if self.on_stall is None:
            return
        now = time.monotonic()
        if now - self._last_stall_check < max(1.0, self.stall_after.total_seconds() / 4):
            return
        self._last_stall_check = now
        stall = check_stall(conn, self.stall_after)
        if stall is not None:
            self.on_stall(stall)

    def _pages(self, should_stop: Callable[[], bool]) -> Iterator[Page]:
        """Non-empty pages after ``position``; the caller moves ``position`` as it consumes
        them, to ``last_position`` once it has consumed a whole page (with ``types``, the
        newest event the read scanned past). Waits between pages, reconnects (and so catches up)
        after connection loss."""
        try:
            yield from self._pages_listening(should_stop)
        finally:
            self._stop_listening()

    def _pages_listening(self, should_stop: Callable[[], bool]) -> Iterator[Page]:
        while not should_stop():
            try:
                if self.conn is None:
                    self.conn = self._connect()
                    # On every (re)connect: the server may have crashed and lost events
                    # this listener already handed out.
                    _drive(self.conn, _ops.check_cursor(self.position))
                self._listen_again(self.conn)
                # Before the read, never after: a notification that comes between the read
                # and a drain would be dropped although its event is not on the page.
                self._drain_notifications(self.conn)
                page = self._read_page(self.conn)
                if page.events:
                    yield page
                elif page.last_position is not None:
                    self.position = page.last_position  # the filter skipped all it scanned
                if len(page.events) == self.page_size:
                    continue  # more to catch up before waiting
                self._maybe_report_stall(self.conn)
                self._wait(self.conn, self.poll_interval, bool(page.events))
            except psycopg.OperationalError:
                self.close()
                self.reconnects += 1
                time.sleep(self.reconnect_delay)

    def events(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[RecordedEvent]:
        """Every event after ``position``, blocking between them; returns when
        ``should_stop()`` is true: checked after every event, and at least once per poll
        interval while nothing arrives."""
        for page in self._pages(should_stop):
            for event in page.events:
                self.position = event.position
                yield event
                if should_stop():
                    return
            self.position = page.last_position

    def batches(
        self, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[list[RecordedEvent]]:
        """Like :meth:`events`, a page at a time (``should_stop()`` is checked between
        pages)."""
        for page in self._pages(should_stop):
            self.position = page.last_position
            yield page.events

    def close(self) -> None:
        self._listening = False
        if self.doorbell is not None:
            self.doorbell.close()
            self.doorbell = None
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# A physical replication stream's messages (the streaming replication protocol).
_WAL_DATA = ord("w")
_KEEPALIVE = ord("k")
_STATUS_UPDATE = struct.Struct("!cQQQqB")  # 'r', write, flush, apply, clock, reply wanted
_POSTGRES_EPOCH = 946_684_800  # 2000-01-01 in Unix time: the protocol's clock counts from it


class WalDoorbell:
    """A physical replication connection used only as a doorbell: the server streams its
    write-ahead log as it is flushed, so a message means a commit may have just become
    visible. Nothing is decoded and no slot is kept, so nothing is retained on the server
    for it. It reports its write, flush and apply positions as 0: the server never counts
    a standby without a valid flush position as synchronous, so a deployment with
    ``synchronous_standby_names`` set never waits for it. Needs the REPLICATION attribute
    and a ``replication`` line in ``pg_hba.conf``; :meth:`open` raises
    ``psycopg.OperationalError`` when the server refuses."""

    # A flushed commit becomes visible a moment after its log is sent: a ring that found
    # nothing new is followed by this many looks, this far apart.
    RECHECKS = 2
    RECHECK_AFTER = 0.0003
    # Rings that keep finding nothing new are log written by others (other tables, a
    # checkpoint): after this many in a row, look no more often than every DRY_GAP.
    DRY_RINGS = 4
    DRY_GAP = 0.002

    def __init__(self, dsn: str, application_name: str = "pgstate") -> None:
        self.conninfo = make_conninfo(
            libpq_dsn(dsn), replication="true", application_name=application_name
        )
        self.pgconn: pq.abc.PGconn | None = None
        # Made by open() and closed by close(): each holds a file descriptor (epoll).
        self.selector: selectors.BaseSelector | None = None
        self.rings = 0
        self._socket = -1
        self._rang = False
        self._owed = 0
        self._dry = 0

    def open(self) -> None:
        pgconn = pq.PGconn.connect(self.conninfo.encode())
        try:
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError(_message(pgconn))
            system = pgconn.exec_(b"IDENTIFY_SYSTEM")
            if system.status != pq.ExecStatus.TUPLES_OK:
                raise psycopg.OperationalError(_message(pgconn))
            flushed = system.get_value(0, 2)  # the server's flush position, X/Y
            assert flushed is not None
            started = pgconn.exec_(b"START_REPLICATION PHYSICAL " + flushed)
            if started.status != pq.ExecStatus.COPY_BOTH:
                raise psycopg.OperationalError(_message(pgconn))
            pgconn.nonblocking = 1
        except BaseException:
            pgconn.finish()
            raise
        self.pgconn = pgconn
        self._socket = pgconn.socket  # kept: a lost connection no longer reports it
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._socket, selectors.EVENT_READ)

    def wait(self, timeout: float) -> bool:
        """Whether log arrived within ``timeout`` seconds (all of it is read and dropped)."""
        pgconn, selector = self.pgconn, self.selector
        if pgconn is None or selector is None:
            raise psycopg.OperationalError("the doorbell is closed")
        if self._drain(pgconn):
            return True
        if not selector.select(timeout):
            return False
        pgconn.consume_input()
        return self._drain(pgconn)

    def pace(self, found: bool, timeout: float) -> None:
        """Block until it is time to look again, given whether the last look ``found``
        something new: at a ring, shortly after a ring that found nothing, or after
        ``timeout`` seconds."""
        if found:
            self._owed = self._dry = 0
        elif self._rang:
            self._owed = self.RECHECKS
            self._dry += 1
        elif self._owed:
            self._owed -= 1
        if self._dry >= self.DRY_RINGS:
            time.sleep(self.DRY_GAP)
        self._rang = self.wait(self.RECHECK_AFTER if self._owed else timeout)
        self.rings += self._rang

    def _drain(self, pgconn: pq.abc.PGconn) -> bool:
        """Read every message already received; True if one carried log."""
        rang = False
        while True:
            size, message = pgconn.get_copy_data(1)
            if size == 0:
                return rang
            if size < 0:  # the stream ended or failed (a restart, a removed segment)
                raise psycopg.OperationalError(_message(pgconn) or "the log stream ended")
            kind = message[0]
            if kind == _WAL_DATA:
                rang = True
            elif kind == _KEEPALIVE and message[-1]:
                # Asked for a reply (wal_sender_timeout): positions 0, never a sync standby.
                clock = int((time.time() - _POSTGRES_EPOCH) * 1_000_000)
                pgconn.put_copy_data(_STATUS_UPDATE.pack(b"r", 0, 0, 0, clock, 0))
                pgconn.flush()

    def close(self) -> None:
        if self.selector is not None:
            self.selector.close()
            self.selector = None
        if self.pgconn is not None:
            self.pgconn.finish()
            self.pgconn = None


def _message(pgconn: pq.abc.PGconn) -> str:
    return pgconn.error_message.decode(errors="replace").strip()


def open_doorbell(
    dsn: str, application_name: str = "pgstate"
) -> tuple[WalDoorbell | None, str | None]:
    """An open :class:`WalDoorbell`, or None and the server's reason for refusing it."""
    doorbell = WalDoorbell(dsn, application_name)
    try:
        doorbell.open()
    except psycopg.OperationalError as refused:
        return None, str(refused)
    return doorbell, None


class Relay:
    """Watches the head of the log and sends one NOTIFY when it moves, so that writers do
    not notify inside their own commits (which serializes commits cluster-wide).

    ``wake``: ``"poll"`` (the default) checks the head every ``interval`` seconds.
    ``"wal"`` checks it when the server streams newly flushed log (a
    :class:`WalDoorbell`, which takes one of the server's ``max_wal_senders``), at most
    once per ``min_gap``, and otherwise every ``fallback`` seconds (an aborted or
    asynchronous commit is flushed late). ``"auto"`` uses the log where the server allows
    a replication connection and polls where it does not (``refusal`` says why)."""

    RETRY_DELAY = 0.1  # seconds between attempts to (re)connect

    def __init__(
        self,
        dsn: str,
        *,
        interval: float = 0.002,
        wake: str = "poll",
        min_gap: float = 0.0002,
        fallback: float = 0.1,
    ) -> None:
        if wake not in ("auto", "wal", "poll"):
            raise ValueError("wake must be 'auto', 'wal' or 'poll'")
        self.dsn = libpq_dsn(dsn)
        self.interval = interval
        self.wake = wake
        self.min_gap = min_gap
        self.fallback = fallback
        self.notified: Position | None = None
        self.waking: str | None = None  # how the current connection is woken: wal or poll
        self.refusal: str | None = None
        self.steps = 0

    def step(self, cursor: psycopg.Cursor[Any]) -> bool:
        """Notify if the head moved since the last notification; True if it did. The
        cursor is kept across steps: a new one per poll costs the relay a sixth of its
        CPU at a poll every half millisecond."""
        self.steps += 1
        last = self.notified or Position(0, 0)
        row = cursor.execute(
            query("notify_if_moved"), {"tx": str(last.tx), "pos": last.pos}
        ).fetchone()
        if row is None:
            return False
        head = Position(int(row[0]), row[1])
        if head == self.notified:
            return False
        self.notified = head
        return True

    def run(
        self, should_stop: Callable[[], bool], on_connect: Callable[[], None] | None = None
    ) -> None:
        """Notify until ``should_stop()``; ``on_connect`` runs after each (re)connection.
        With ``wake="wal"`` and a server that refuses the log stream, it never polls: it
        logs the refusal (``pgstate.listen``, once per distinct reason) and tries again
        every ``RETRY_DELAY`` seconds; ``wake="auto"`` polls instead."""
        last_problem: str | None = None
        while not should_stop():
            doorbell = None
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    _prepare_adapters(conn.adapters)
                    if self.wake != "poll":
                        doorbell, self.refusal = open_doorbell(self.dsn, "pgstate_relay")
                        if doorbell is None and self.wake == "wal":
                            reason = f" ({self.refusal})" if self.refusal else ""
                            raise psycopg.OperationalError(
                                f"the server refuses the log stream{reason}"
                                " and the relay was told to wake on nothing else"
                            )
                    self.waking = "poll" if doorbell is None else "wal"
                    last_problem = None
                    if on_connect is not None:
                        on_connect()
                    cursor = conn.cursor()
                    while not should_stop():
                        moved = self.step(cursor)
                        if doorbell is None:
                            time.sleep(self.interval)
                            continue
                        if self.min_gap:
                            time.sleep(self.min_gap)  # rings meanwhile get one look
                        doorbell.pace(moved, self.fallback)
            except psycopg.Error as problem:
                # A lost connection, and also a database not migrated yet (a worker started
                # before `pgstate migrate`): warn once per problem and keep trying.
                self.waking = None
                if str(problem) != last_problem:
                    last_problem = str(problem)
                    log.warning("relay: %s; trying again every %g s", problem, self.RETRY_DELAY)
                time.sleep(self.RETRY_DELAY)
            finally:
                if doorbell is not None:
                    doorbell.close()


def set_notify_mode(conn: psycopg.Connection[Any], mode: str) -> None:
    """``commit``: every writing transaction notifies; ``relay``: a :class:`Relay` does.
    An operator's call: the role needs ``pgstate_admin`` (else :class:`PermissionDenied`)."""
    try:
        conn.execute(query("set_notify_mode"), {"mode": mode})
    except psycopg.Error as exc:
        raise translate(exc) from exc
