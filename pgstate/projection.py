"""Projections: read models kept from the log.

* **Inline** projections (:class:`InlineProjection`, :class:`AsyncInlineProjection`) run
  inside the transaction that appends or transitions, so their tables are never behind the
  log. Pass them to ``Store(..., inline_projections=[...])``.
* **Async** projections (:class:`Projection`) run in a :class:`ProjectionWorker`: the
  checkpoint commits in the same transaction as the projection's rows (exactly once), only
  moves forward, and is fenced by a lease epoch, so a worker that lost its lease cannot
  write. Consumer groups split streams by hash and keep each stream's order. An event that
  keeps failing is parked with its error, and the projection moves on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgstate import _ops
from pgstate._connect import libpq_dsn
from pgstate._driver import _prepare_adapters, arun
from pgstate._sql import query
from pgstate.errors import (
    ConnectionLost,
    InvalidInput,
    LeaseHeld,
    LeaseLost,
    PermissionDenied,
    PositionNotInLog,
    TransientError,
    translate,
)
from pgstate.models import START, AppendResult, Instance, Position, RecordedEvent, TransitionResult

log = logging.getLogger(__name__)


class InlineProjection:
    """Runs in the writing transaction. Override :meth:`apply`; set ``types`` to receive
    only some event types."""

    name: str = ""
    types: Sequence[str] | None = None

    def wants(self, event: RecordedEvent) -> bool:
        return self.types is None or event.type in self.types

    def apply(self, conn: psycopg.Connection[Any], event: RecordedEvent) -> None:
        raise NotImplementedError


class AsyncInlineProjection:
    """The asyncio form of :class:`InlineProjection`, for ``AsyncStore``."""

    name: str = ""
    types: Sequence[str] | None = None

    def wants(self, event: RecordedEvent) -> bool:
        return self.types is None or event.type in self.types

    async def apply(self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent) -> None:
        raise NotImplementedError


def written_ranges(result: object) -> list[tuple[int, int, int]]:
    """The (tx, first pos, last pos) ranges a write call stored; empty for duplicates."""
    if isinstance(result, list):
        return [r for item in result for r in written_ranges(item)]
    if isinstance(result, AppendResult) and not result.duplicate:
        return [(result.first_position.tx, result.first_position.pos, result.last_position.pos)]
    if isinstance(result, TransitionResult) and result.outcome == "applied" and result.position:
        return [(result.position.tx, result.position.pos, result.position.pos)]
    if isinstance(result, Instance) and not result.duplicate:
        return [(result.position.tx, result.position.pos, result.position.pos)]
    return []


def read_range_params(tx: int, first: int, last: int) -> dict[str, Any]:
    return {"tx": str(tx), "first": first, "last": last}


class Projection:
    """An async projection. Set ``name`` (the checkpoint's key), optionally ``types`` and
    ``table`` (the read-model table :func:`rebuild` swaps), and implement :meth:`apply`
    (and :meth:`setup` to create the table). ``apply`` runs inside the transaction that
    also stores the checkpoint; it must write through the connection it is given."""

    name: str = ""
    types: Sequence[str] | None = None
    table: str | None = None

    async def setup(self, conn: psycopg.AsyncConnection[Any], table: str) -> None:
        """Create ``table`` if it does not exist (used by the worker and by rebuilds)."""

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        raise NotImplementedError


def _default_owner() -> str:
    # Unique per worker object: two workers in one process must not share a lease.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _StillFailing(Exception):
    """A parked event's projection failed again: roll its retry back."""


class SwallowedDatabaseError(Exception):
    """The projection caught an error of its own statement and returned: its transaction
    is aborted, so the event counts as failed and its savepoint is rolled back."""


async def _apply_checked(
    projection: Projection, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
) -> None:
    """``projection.apply``, then a check that it did not leave the transaction aborted:
    a caught error of its own statement would otherwise roll back, at the commit, the rows
    of every event of the page, with no error anywhere."""
    await projection.apply(conn, event, table)
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        raise SwallowedDatabaseError("the projection caught a database error and returned")


def _check_worker_settings(page_size: object, max_attempts: object, poll_interval: object) -> None:
    _ops.check_limit(page_size, "page_size")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidInput("max_attempts must be an int >= 1", detail={"field": "max_attempts"})
    _ops.check_interval(poll_interval, "poll_interval")


class ProjectionWorker:
    """Runs one projection (or one member of its consumer group). Only one worker per
    member is active at a time: the others wait and take over when its lease runs out."""

    def __init__(
        self,
        dsn: str,
        projection: Projection,
        *,
        member: int = 0,
        members: int = 1,
        owner: str | None = None,
        lease_ttl: timedelta = timedelta(seconds=10),
        poll_interval: float = 0.5,
        page_size: int = 500,
        max_attempts: int = 3,
        use_listen: bool = True,
    ) -> None:
        if not projection.name:
            raise ValueError("a projection needs a name")
        _check_worker_settings(page_size, max_attempts, poll_interval)
        self.dsn = libpq_dsn(dsn)
        self.projection = projection
        self.member = member
        self.members = members
        self.owner = owner or _default_owner()
        self.ttl_ms = int(lease_ttl / timedelta(milliseconds=1))
        self.poll_interval = poll_interval
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.use_listen = use_listen
        self.epoch: int | None = None
        self.position: Position = START
        self.failures: dict[Position, int] = {}
        self.handled = 0
        self.parked = 0
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self._fenced_at = 0.0

    @property
    def table(self) -> str:
        return self.projection.table or self.projection.name

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            _prepare_adapters(self.conn.adapters)
            if self.use_listen:
                await self.conn.execute(query("listen"))
            self.epoch = None
        return self.conn

    async def _execute(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        conn = await self._connection()
        try:
            cursor = await conn.execute(query(name), params, binary=True)
        except psycopg.Error as exc:
            raise translate(exc) from exc
        return await cursor.fetchall() if cursor.description is not None else []

    async def claim(self) -> bool:
        """Try to become the active worker; False if another owner holds the lease."""
        try:
            rows = await self._execute(
                "claim_projection",
                {
                    "projection": self.projection.name,
                    "member": self.member,
                    "members": self.members,
                    "owner": self.owner,
                    "ttl_ms": self.ttl_ms,
                },
            )
        except LeaseHeld:
            return False
        epoch, tx, pos = rows[0]
        self.epoch = epoch
        self.position = Position(int(tx), pos)
        self._fenced_at = time.monotonic()
        conn = await self._connection()
        # On every claim, so after every reconnect: a crash may have taken back events the
        # checkpoint already counts.
        try:
            await arun(conn, _ops.check_cursor(self.position))
        except PositionNotInLog:
            await self.release()
            raise
        await self.projection.setup(conn, self.table)
        return True

    def _fence_params(self) -> dict[str, Any]:
        return {
            "projection": self.projection.name,
            "member": self.member,
            "epoch": self.epoch,
            "tx": str(self.position.tx),
            "pos": self.position.pos,
            "ttl_ms": self.ttl_ms,
        }

    async def renew(self) -> None:
        """Extend the lease while idle; raises LeaseLost if another worker took over."""
        if self.epoch is None:
            return
        try:
            await self._execute("fence_projection", self._fence_params())
        except LeaseLost:
            self.epoch = None
            raise
        self._fenced_at = time.monotonic()

    async def run_once(self) -> int:
        """Handle the next page of events; returns how many events it moved past."""
        if self.epoch is None and not await self.claim():
            return 0
        rows = await self._execute(
            "read_member",
            {
                "tx": str(self.position.tx),
                "pos": self.position.pos,
                "members": self.members,
                "member": self.member,
                "limit": self.page_size,
            },
        )
        events = _ops.records(rows)
        if not events:
            return 0
        conn = await self._connection()
        done: Position | None = None
        try:
            async with conn.transaction():
                # Fence first: the checkpoint row is locked and checked before any
                # projection row is written, in every page.
                await conn.execute(query("fence_projection"), self._fence_params())
                self._fenced_at = time.monotonic()
                done = await self._apply_page(conn, events)
                if done is not None:
                    await conn.execute(
                        query("save_checkpoint"),
                        {
                            "projection": self.projection.name,
                            "member": self.member,
                            "epoch": self.epoch,
                            "tx": str(done.tx),
                            "pos": done.pos,
                            "ttl_ms": self.ttl_ms,
                        },
                    )
        except psycopg.Error as exc:
            # Fenced (or the connection broke): nothing of this page was committed.
            self.epoch = None
            raise translate(exc) from exc
        if done is None:
            return 0
        moved = sum(1 for e in events if e.position <= done)
        self.position = done
        return moved

    async def _apply_page(
        self, conn: psycopg.AsyncConnection[Any], events: list[RecordedEvent]
    ) -> Position | None:
        done: Position | None = None
        types = self.projection.types
        for event in events:
            if types is None or event.type in types:
                try:
                    async with conn.transaction():  # a savepoint per event
                        # Raises inside the block: the savepoint rolls back and the
                        # page's transaction goes on.
                        await _apply_checked(self.projection, conn, event, self.table)
                except Exception as exc:
                    attempts = self.failures.get(event.position, 0) + 1
                    self.failures[event.position] = attempts
                    if attempts < self.max_attempts:
                        return done  # commit what went well; retry this one next time
                    await conn.execute(
                        query("park_event"),
                        {
                            "projection": self.projection.name,
                            "member": self.member,
                            "epoch": self.epoch,
                            "tx": str(event.position.tx),
                            "pos": event.position.pos,
                            "error": f"{type(exc).__name__}: {exc}",
                            "attempts": attempts,
                        },
                    )
                    self.parked += 1
                self.failures.pop(event.position, None)
                self.handled += 1
            done = event.position
        return done

    async def wait(self) -> None:
        """Sleep until a notification arrives or the poll interval passes."""
        conn = await self._connection()
        if self.use_listen:
            async for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                pass
        else:
            await asyncio.sleep(self.poll_interval)

    async def drain_notifications(self) -> None:
        """Drop the notifications that arrived while a page was applied: the pages read
        since cover them, and left alone they pile up for as long as the worker is busy."""
        if self.use_listen and self.conn is not None and not self.conn.closed:
            async for _ in self.conn.notifies(timeout=0):
                pass

    async def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Claim, then catch up and follow the log until ``should_stop()``; reconnects and
        catches up after connection loss, and re-claims after losing the lease."""
        renew_after = self.ttl_ms / 3000
        while not should_stop():
            try:
                moved = await self.run_once()
                if moved:
                    await self.drain_notifications()
                if moved == 0:
                    if time.monotonic() - self._fenced_at > renew_after:
                        await self.renew()
                    await self.wait()
            except (psycopg.OperationalError, ConnectionLost):
                await self.close()
                await asyncio.sleep(0.1)
            except (LeaseLost, LeaseHeld):
                # Another worker owns the projection now: wait, then try to take over.
                self.epoch = None
                await asyncio.sleep(self.poll_interval)
            except TransientError:
                # Deadlock, serialization failure, lock timeout: the page was rolled back.
                self.epoch = None
                await asyncio.sleep(0.05)

    async def parked_events(self) -> list[tuple[Any, ...]]:
        return await self._execute("parked_events", {"projection": self.projection.name})

    async def retry_parked(self) -> int:
        """Apply parked events again. Each is taken off the parked list and applied in one
        transaction, so two retries at once apply it once (the second finds it gone), and
        one whose projection fails again is rolled back and stays parked as it was. Returns
        how many were applied. Errors of pgstate's own statements (a lost connection)
        propagate."""
        conn = await self._connection()
        succeeded = 0
        for tx, pos, *_ in await self.parked_events():
            rows = await self._execute("read_one", {"tx": str(tx), "pos": pos})
            if not rows:
                continue
            event = _ops.record(rows[0])
            try:
                async with conn.transaction():
                    taken = await conn.execute(
                        query("unpark_event"),
                        {"projection": self.projection.name, "tx": str(tx), "pos": pos},
                    )
                    row = await taken.fetchone()
                    if row is None or not row[0]:
                        continue  # another retry took it first
                    try:
                        await _apply_checked(self.projection, conn, event, self.table)
                    except Exception as failure:
                        raise _StillFailing from failure
            except _StillFailing as still:
                log.warning(
                    "projection %s: parked event %s:%s failed again: %r",
                    self.projection.name,
                    tx,
                    pos,
                    still.__cause__,
                )
                continue
            except psycopg.Error as exc:
                raise translate(exc) from exc
            succeeded += 1
        return succeeded

    async def release(self) -> None:
        if self.epoch is not None:
            await self._execute(
                "release_projection",
                {"projection": self.projection.name, "member": self.member, "epoch": self.epoch},
            )
            self.epoch = None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        self.epoch = None


async def wait_for_projection(
    dsn: str,
    projection: str,
    position: Position | str,
    *,
    stream_id: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Return once the projection has handled everything up to ``position`` (for a
    consumer group, the member that owns ``stream_id``); raise TimeoutError otherwise."""
    position = _ops.checked_wait(position, timeout)
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(libpq_dsn(dsn), autocommit=True) as conn:
        _prepare_adapters(conn.adapters)
        while True:
            cursor = await conn.execute(query("checkpoints_of"), {"projection": projection})
            rows = await cursor.fetchall()
            if rows:
                members = rows[0][1]
                member = 0
                if members > 1:
                    if stream_id is None:
                        raise ValueError("a consumer group needs stream_id to wait on")
                    found = await conn.execute(
                        query("member_of_stream"), {"stream_id": stream_id, "members": members}
                    )
                    member_row = await found.fetchone()
                    assert member_row is not None
                    member = member_row[0]
                for row_member, _, tx, pos in rows:
                    if row_member == member and Position(int(tx), pos) >= position:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"projection {projection} did not reach {position}")
            await asyncio.sleep(0.005)


async def rebuild(
    dsn: str,
    projection: Projection,
    *,
    page_size: int = 2000,
    progress: Callable[[int, int], None] | None = None,
    owner: str | None = None,
) -> Position:
    """Rebuild a projection's table from the whole log into a shadow table, then, in one
    transaction that fences the live workers (every member of a consumer group), catch up
    the tail and swap the shadow in. Returns the position the rebuilt table is at, which
    becomes every member's checkpoint."""
    if not projection.table:
        raise ValueError("rebuild needs a projection with a table")
    shadow = f"{projection.table}__rebuild"
    owner_name = owner or f"rebuild:{_default_owner()}"
    conn = await psycopg.AsyncConnection.connect(libpq_dsn(dsn), autocommit=True)
    _prepare_adapters(conn.adapters)
    try:
        # Checked before the copy, which would otherwise run to its end for nothing.
        allowed = await (await conn.execute(query("may_take_over_projection"))).fetchone()
        if allowed is None or not allowed[0]:
            raise PermissionDenied(
                "rebuild takes the projection over from its live workers, an operator's"
                " call: connect as pgstate_admin (or the schema's owner)",
                sqlstate=PermissionDenied.sqlstate,
            )
        locked = await (
            await conn.execute(query("try_rebuild_lock"), {"projection": projection.name})
        ).fetchone()
        if locked is None or not locked[0]:
            raise LeaseHeld(
                f"another rebuild of projection {projection.name} is running",
                sqlstate=LeaseHeld.code,
                detail={"projection": projection.name},
            )
        await conn.execute(sql.SQL(query("drop_table")).format(table=sql.Identifier(shadow)))
        await projection.setup(conn, shadow)
        estimate_row = await (await conn.execute(query("estimated_events"))).fetchone()
        estimate = int(estimate_row[0]) if estimate_row else 0
        position, seen = START, 0

        async def copy_pages(limit_to_head: bool) -> None:
            nonlocal position, seen
            while True:
                cursor = await conn.execute(
                    query("read_member"),
                    {
                        "tx": str(position.tx),
                        "pos": position.pos,
                        "members": 1,
                        "member": 0,
                        "limit": page_size,
                    },
                    binary=True,
                )
                events = _ops.records(await cursor.fetchall())
                if not events:
                    return
                async with conn.transaction():
                    for event in events:
                        if projection.types is None or event.type in projection.types:
                            await _apply_checked(projection, conn, event, shadow)
                position = events[-1].position
                seen += len(events)
                if progress is not None:
                    progress(seen, max(estimate, seen))

        await copy_pages(False)
        # The swap, in one transaction: take every member's checkpoint over from any live
        # worker (its epoch is now stale, so its next page is refused), catch up the tail,
        # swap the tables, and store the position the new table is at as every member's
        # checkpoint (the table now holds every stream up to it).
        ttl_ms = 60_000
        epochs: list[int] = []
        async with conn.transaction():
            group = await conn.execute(query("checkpoints_of"), {"projection": projection.name})
            members = max((int(row[1]) for row in await group.fetchall()), default=1)
            for member in range(members):
                claimed = await conn.execute(
                    query("take_over_projection"),
                    {
                        "projection": projection.name,
                        "member": member,
                        "members": members,
                        "owner": owner_name,
                        "ttl_ms": ttl_ms,
                    },
                )
                claim_row = await claimed.fetchone()
                assert claim_row is not None
                epochs.append(claim_row[0])
            await copy_pages(True)
            await conn.execute(
                sql.SQL(query("drop_table")).format(table=sql.Identifier(projection.table))
            )
            await conn.execute(
                sql.SQL(query("rename_table")).format(
                    table=sql.Identifier(shadow), new_name=sql.Identifier(projection.table)
                )
            )
            # The rebuilt table holds every event up to the new checkpoint: one parked
            # before it is in there now, and a retry would apply it twice.
            parked = await conn.execute(query("parked_events"), {"projection": projection.name})
            for tx, pos, *_ in await parked.fetchall():
                if Position(int(tx), pos) <= position:
                    await conn.execute(
                        query("unpark_event"),
                        {"projection": projection.name, "tx": str(tx), "pos": pos},
                    )
            for member, epoch in enumerate(epochs):
                await conn.execute(
                    query("save_checkpoint"),
                    {
                        "projection": projection.name,
                        "member": member,
                        "epoch": epoch,
                        "tx": str(position.tx),
                        "pos": position.pos,
                        "ttl_ms": ttl_ms,
                    },
                )
        for member, epoch in enumerate(epochs):
            await conn.execute(
                query("release_projection"),
                {"projection": projection.name, "member": member, "epoch": epoch},
            )
        return position
    finally:
        await conn.close()
