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

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pgstate import _ops
from pgstate._connect import libpq_dsn
from pgstate._driver import _prepare_adapters
from pgstate._sql import query
from pgstate.models import Position, RecordedEvent

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
    ) -> None:
        self.dsn = libpq_dsn(dsn)
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
        self._last_stall_check = 0.0

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True)
        _prepare_adapters(conn.adapters)
        if self.use_listen:
            # LISTEN before catching up: a commit during the catch-up still wakes us.
            conn.execute(query("listen"))
        return conn

    def _read_page(self, conn: psycopg.Connection[Any]) -> list[RecordedEvent]:
        op = _ops.read_all(self.tenant, self.position, self.page_size, self.types)
        statement = next(op)
        cursor = conn.cursor(binary=True)
        cursor.execute(statement.sql, statement.params)
        try:
            op.send(cursor.fetchall())
        except StopIteration as stop:
            page = stop.value
            return list(page.events)
        raise RuntimeError("read_all yields one statement")

    def _wait(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        if self.use_listen:
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        else:
            time.sleep(timeout)

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

    def _pages(self, should_stop: Callable[[], bool]) -> Iterator[list[RecordedEvent]]:
        """Non-empty pages after ``position``; the caller moves ``position`` as it consumes
        them. Waits between pages, reconnects (and so catches up) after connection loss."""
        while not should_stop():
            try:
                if self.conn is None:
                    self.conn = self._connect()
                page = self._read_page(self.conn)
                if page:
                    yield page
                if len(page) == self.page_size:
                    continue  # more to catch up before waiting
                self._maybe_report_stall(self.conn)
                self._wait(self.conn, self.poll_interval)
            except psycopg.OperationalError:
                self.close()
                self.reconnects += 1
                time.sleep(self.reconnect_delay)

    def events(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[RecordedEvent]:
        """Every event after ``position``, blocking between them; returns when
        ``should_stop()`` is true (checked at least once per poll interval)."""
        for page in self._pages(should_stop):
            for event in page:
                self.position = event.position
                yield event

    def batches(
        self, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[list[RecordedEvent]]:
        """Like :meth:`events`, a page at a time."""
        for page in self._pages(should_stop):
            self.position = page[-1].position
            yield page

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


class Relay:
    """Watches the head of the log and sends one NOTIFY when it moves, so that writers do
    not notify inside their own commits (which serializes commits cluster-wide)."""

    def __init__(self, dsn: str, *, interval: float = 0.002) -> None:
        self.dsn = libpq_dsn(dsn)
        self.interval = interval
        self.notified: Position | None = None

    def step(self, cursor: psycopg.Cursor[Any]) -> bool:
        """Notify if the head moved since the last notification; True if it did. The
        cursor is kept across steps: a new one per poll costs the relay a sixth of its
        CPU at a poll every half millisecond."""
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
        """Notify until ``should_stop()``; ``on_connect`` runs after each (re)connection."""
        while not should_stop():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    _prepare_adapters(conn.adapters)
                    if on_connect is not None:
                        on_connect()
                    cursor = conn.cursor()
                    while not should_stop():
                        self.step(cursor)
                        time.sleep(self.interval)
            except psycopg.OperationalError:
                time.sleep(0.1)


def set_notify_mode(conn: psycopg.Connection[Any], mode: str) -> None:
    """``commit``: every writing transaction notifies; ``relay``: a :class:`Relay` does."""
    conn.execute(query("set_notify_mode"), {"mode": mode})
