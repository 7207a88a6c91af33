"""Store and AsyncStore: the public API. Both have the same method names and signatures;
each method is one line that hands a sans-IO operation from ``_ops`` to the driver."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from pgstate import _machine_ops, _ops, migrate
from pgstate._connect import (
    AsyncConn,
    SyncConn,
    async_engine,
    raw_async,
    raw_sync,
    sync_engine,
)
from pgstate._driver import acall_lock, arun, asavepoint, call_lock, run, savepoint
from pgstate._ops import Op, check_identifier
from pgstate._telemetry import append_span, current_traceparent, transition_span
from pgstate.config import Settings
from pgstate.errors import translate
from pgstate.fold import Fold, FoldedState, load_state
from pgstate.models import (
    AppendResult,
    ExpectedVersion,
    FiredTimeout,
    History,
    Instance,
    Lease,
    MachineRegistration,
    NewEvent,
    Page,
    Position,
    RecordedEvent,
    StreamAppend,
    StreamCondition,
    StreamState,
    TransitionResult,
)
from pgstate.projection import AsyncInlineProjection, InlineProjection, written_ranges

if TYPE_CHECKING:
    from pgstate.machine import Machine


# The keyword options of transition() and try_transition(), passed on as they are.
_NOT_OPTIONS = frozenset({"self", "stream_id", "event", "conn"})


def _transition_options(arguments: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in arguments.items() if name not in _NOT_OPTIONS}


class _StoreBase:
    def __init__(self, settings: Settings | None, tenant: str | None) -> None:
        self.settings = settings or Settings()
        # Only a missing tenant falls back to the settings: an empty one is an error, not
        # the default tenant's data.
        chosen = self.settings.tenant if tenant is None else tenant
        self.tenant = check_identifier(chosen, "tenant", 100)


class Store(_StoreBase):
    """Synchronous store. ``conn=`` runs a call inside the caller's transaction (a
    SQLAlchemy Connection or Session, or a psycopg connection) and never commits it;
    without it, each call runs in its own transaction."""

    def __init__(
        self,
        engine_or_url: Engine | str | URL | None = None,
        *,
        tenant: str | None = None,
        settings: Settings | None = None,
        inline_projections: Sequence[InlineProjection] = (),
    ) -> None:
        super().__init__(settings, tenant)
        self.engine = sync_engine(engine_or_url, self.settings)
        self.inline_projections = list(inline_projections)
        # Single-statement calls run in autocommit: one round trip, no BEGIN/COMMIT.
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def _call(
        self, op: Op, conn: SyncConn | None, *, atomic: bool = False, writes: bool = False
    ) -> Any:
        project = writes and bool(self.inline_projections)
        if conn is not None:
            raw = raw_sync(conn)
            with call_lock(raw):
                if project and raw.autocommit:
                    with raw.transaction():
                        return self._run_projected(raw, op)
                if project:
                    with savepoint(raw):
                        return self._run_projected(raw, op)
                return run(raw, op, atomic=atomic)
        engine = self.engine if atomic or project else self._autocommit_engine
        try:
            with engine.connect() as own:
                raw = raw_sync(own)
                result = self._run_projected(raw, op) if project else run(raw, op)
                own.commit()
                return result
        except DBAPIError as exc:
            # Connecting or committing failed: the outcome of a commit is then unknown.
            raise translate(exc.orig if exc.orig is not None else exc) from exc

    def _run_projected(self, raw: psycopg.Connection[Any], op: Op) -> Any:
        """Run a write and then the inline projections on what it stored, in the same
        transaction: the read models are never behind the log."""
        result = run(raw, op)
        for tx, first, last in written_ranges(result):
            events: list[RecordedEvent] = run(raw, _ops.read_range(tx, first, last))
            for event in events:
                for projection in self.inline_projections:
                    if projection.wants(event):
                        projection.apply(raw, event)
        return result

    def wait_for(self, position: Position | str, *, timeout: float = 10.0) -> None:
        """Return once ``position`` is visible to tailing readers (read-your-writes for
        read_all and listeners); raise TimeoutError after ``timeout`` seconds."""
        position = _ops.checked_wait(position, timeout)
        deadline = time.monotonic() + timeout
        while self._call(_ops.watermark(), None) <= position.tx:
            if time.monotonic() > deadline:
                raise TimeoutError(f"position {position} not visible after {timeout}s")
            time.sleep(0.002)

    def load_state(
        self, stream_id: str, fold: Fold, *, use_snapshot: bool = True, conn: SyncConn | None = None
    ) -> FoldedState:
        """Fold the stream's events (after the newest snapshot) into a state."""
        op = load_state(self.tenant, stream_id, fold, use_snapshot)
        folded: FoldedState = self._call(op, conn, atomic=True)
        return folded

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def migrate(self) -> None:
        """Bring the database to the newest schema (same as ``pgstate migrate``)."""
        migrate.upgrade(self.engine)

    def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion | int = ExpectedVersion.ANY,
        actor: Mapping[str, Any] | None = None,
        traceparent: str | None = None,
        conn: SyncConn | None = None,
    ) -> AppendResult:
        """Append events to one stream if it is at ``expected_version``. A version conflict
        raises VersionConflict, which carries the stream's head; inside ``conn``'s
        transaction it stores nothing and leaves the transaction usable."""
        with append_span(stream_id, events) as span:
            op = _ops.append(
                self.settings,
                self.tenant,
                stream_id,
                events,
                expected_version,
                actor,
                traceparent or span.traceparent,
            )
            result: AppendResult = span.record(self._call(op, conn, writes=True))
            return result

    def append_many(
        self,
        appends: Iterable[StreamAppend],
        *,
        conditions: Iterable[StreamCondition] = (),
        actor: Mapping[str, Any] | None = None,
        traceparent: str | None = None,
        conn: SyncConn | None = None,
    ) -> list[AppendResult]:
        """Append to several streams atomically, each at its expected version, while the
        ``conditions`` streams hold their expected versions."""
        op = _ops.append_many(self.settings, self.tenant, appends, conditions, actor, traceparent)
        results: list[AppendResult] = self._call(op, conn, atomic=True, writes=True)
        return results

    def check_version(
        self,
        stream_id: str,
        expected_version: ExpectedVersion | int,
        *,
        conn: SyncConn | None = None,
    ) -> int:
        """Check a stream's version and hold its lock until the transaction ends; returns the
        version. Pass ``conn=`` (your transaction): without it the call commits at once and
        the lock ends with it."""
        version: int = self._call(
            _ops.check_version(self.tenant, stream_id, expected_version), conn
        )
        return version

    def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
        conn: SyncConn | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream in version order (or reverse order with ``backwards``)."""
        op = _ops.read_stream(self.tenant, stream_id, from_version, limit, backwards)
        events: list[RecordedEvent] = self._call(op, conn)
        return events

    def read_all(
        self,
        *,
        after: Position | str | None = None,
        limit: int = 1000,
        types: Sequence[str] | None = None,
        conn: SyncConn | None = None,
    ) -> Page:
        """The next page of the whole log in commit order after ``after``."""
        page: Page = self._call(_ops.read_all(self.tenant, after, limit, types), conn)
        return page

    def read_category(
        self,
        category: str,
        *,
        after: Position | str | None = None,
        limit: int = 1000,
        types: Sequence[str] | None = None,
        conn: SyncConn | None = None,
    ) -> Page:
        """Like :meth:`read_all`, for the streams of one category (the id before '-')."""
        op = _ops.read_category(self.tenant, category, after, limit, types)
        page: Page = self._call(op, conn)
        return page

    def stream_state(self, stream_id: str, *, conn: SyncConn | None = None) -> StreamState | None:
        """The stream's head row, or None if it has no events."""
        state: StreamState | None = self._call(_ops.stream_state(self.tenant, stream_id), conn)
        return state

    def register(
        self, machine: type[Machine], *, conn: SyncConn | None = None
    ) -> MachineRegistration:
        """Store a machine definition; the same definition again is a no-op."""
        registration: MachineRegistration = self._call(_machine_ops.register(machine), conn)
        return registration

    def create(
        self,
        stream_id: str,
        machine: type[Machine] | str,
        *,
        data: Mapping[str, Any] | None = None,
        actor: Mapping[str, Any] | None = None,
        event_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        traceparent: str | None = None,
        conn: SyncConn | None = None,
    ) -> Instance:
        """Start an instance of ``machine`` in its initial state. Pass ``event_id`` to make
        a retried create return the first attempt's result."""
        op = _machine_ops.create(
            self.tenant,
            stream_id,
            machine,
            data,
            actor,
            event_id,
            causation_id,
            correlation_id,
            traceparent or current_traceparent(),
            max_data_bytes=self.settings.max_event_bytes,
        )
        instance: Instance = self._call(op, conn, writes=True)
        return instance

    def _transition(
        self,
        stream_id: str,
        event: str,
        conn: SyncConn | None,
        *,
        raise_rejection: bool,
        options: dict[str, Any],
    ) -> TransitionResult:
        with transition_span(stream_id, event) as span:
            options["traceparent"] = options["traceparent"] or span.traceparent
            op = _machine_ops.transition(
                self.tenant,
                stream_id,
                event,
                raise_rejection=raise_rejection,
                max_data_bytes=self.settings.max_event_bytes,
                **options,
            )
            result: TransitionResult = span.record(self._call(op, conn, writes=True))
            return result

    def transition(
        self,
        stream_id: str,
        event: str,
        *,
        expected_state: str | None = None,
        expected_version: int | None = None,
        lease_epoch: int | None = None,
        idempotency_key: str | None = None,
        actor: Mapping[str, Any] | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        release_lease: bool = False,
        event_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        traceparent: str | None = None,
        record_as: str | None = None,
        conn: SyncConn | None = None,
    ) -> TransitionResult:
        """Apply ``event`` to the instance, or raise the typed rejection. The stored
        event's type is ``record_as`` if given, else the event's name."""
        return self._transition(
            stream_id, event, conn, raise_rejection=True, options=_transition_options(locals())
        )

    def try_transition(
        self,
        stream_id: str,
        event: str,
        *,
        expected_state: str | None = None,
        expected_version: int | None = None,
        lease_epoch: int | None = None,
        idempotency_key: str | None = None,
        actor: Mapping[str, Any] | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        release_lease: bool = False,
        event_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        traceparent: str | None = None,
        record_as: str | None = None,
        conn: SyncConn | None = None,
    ) -> TransitionResult:
        """Like :meth:`transition`, but a rejection is returned (``outcome='rejected'``,
        the typed error in ``error``) and recorded for audit instead of raised."""
        return self._transition(
            stream_id, event, conn, raise_rejection=False, options=_transition_options(locals())
        )

    def acquire_lease(
        self, stream_id: str, owner: str, ttl: timedelta, *, conn: SyncConn | None = None
    ) -> Lease:
        """Take (or, for the same owner, extend) the lease; a new owner gets a new epoch."""
        lease: Lease = self._call(
            _machine_ops.acquire_lease(self.tenant, stream_id, owner, ttl), conn
        )
        return lease

    def renew_lease(self, lease: Lease, ttl: timedelta, *, conn: SyncConn | None = None) -> Lease:
        """Extend a live lease; raises LeaseLost if it expired or changed hands."""
        op = _machine_ops.renew_lease(self.tenant, lease.stream_id, lease.owner, lease.epoch, ttl)
        renewed: Lease = self._call(op, conn)
        return renewed

    def release_lease(self, lease: Lease, *, conn: SyncConn | None = None) -> None:
        """Give the lease up; raises LeaseLost if it changed hands meanwhile."""
        op = _machine_ops.release_lease(self.tenant, lease.stream_id, lease.owner, lease.epoch)
        self._call(op, conn)

    def fire_due_timeouts(
        self, limit: int = 100, *, conn: SyncConn | None = None
    ) -> list[FiredTimeout]:
        """Fire the timeout edges of instances whose deadline passed (all tenants); safe
        to run from several workers at once."""
        fired: list[FiredTimeout] = self._call(_machine_ops.fire_due_timeouts(limit), conn)
        return fired

    def migrate_instances(
        self,
        machine: type[Machine] | str,
        from_version: int,
        to_version: int,
        state_map: Mapping[str, str],
        *,
        actor: Mapping[str, Any] | None = None,
        conn: SyncConn | None = None,
    ) -> int:
        """Move live (not finished) instances to another machine version, each under its
        lock with a ``$migrated`` event; returns how many moved. Without ``conn`` each batch
        of instances commits on its own, so the locks held at once stay bounded."""
        moved, after = 0, None
        while True:
            op = _machine_ops.migrate_instances(
                self.tenant, machine, from_version, to_version, state_map, actor, after
            )
            batch: tuple[int, str | None] = self._call(op, conn, atomic=True)
            moved += batch[0]
            if batch[1] is None:  # a batch that found no instance left
                return moved
            after = batch[1]

    def find_in_state(
        self,
        machine: type[Machine] | str,
        state: str,
        *,
        limit: int = 100,
        conn: SyncConn | None = None,
    ) -> list[str]:
        """Ids of instances in ``state``, lowest first."""
        ids: list[str] = self._call(
            _machine_ops.find_in_state(self.tenant, machine, state, limit), conn
        )
        return ids

    def history(self, stream_id: str, *, conn: SyncConn | None = None) -> History:
        """The stream's events and the rejected attempts on it."""
        found: History = self._call(_machine_ops.history(self.tenant, stream_id), conn, atomic=True)
        return found


class AsyncStore(_StoreBase):
    """The asyncio twin of :class:`Store`: same names, same signatures, awaited."""

    def __init__(
        self,
        engine_or_url: AsyncEngine | str | URL | None = None,
        *,
        tenant: str | None = None,
        settings: Settings | None = None,
        inline_projections: Sequence[AsyncInlineProjection] = (),
    ) -> None:
        super().__init__(settings, tenant)
        self.engine = async_engine(engine_or_url, self.settings)
        self.inline_projections = list(inline_projections)
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    async def _call(
        self, op: Op, conn: AsyncConn | None, *, atomic: bool = False, writes: bool = False
    ) -> Any:
        project = writes and bool(self.inline_projections)
        if conn is not None:
            raw = await raw_async(conn)
            async with acall_lock(raw):
                if project and raw.autocommit:
                    async with raw.transaction():
                        return await self._run_projected(raw, op)
                if project:
                    async with asavepoint(raw):
                        return await self._run_projected(raw, op)
                return await arun(raw, op, atomic=atomic)
        engine = self.engine if atomic or project else self._autocommit_engine
        try:
            async with engine.connect() as own:
                raw = await raw_async(own)
                result = await self._run_projected(raw, op) if project else await arun(raw, op)
                await own.commit()
                return result
        except DBAPIError as exc:
            raise translate(exc.orig if exc.orig is not None else exc) from exc

    async def _run_projected(self, raw: psycopg.AsyncConnection[Any], op: Op) -> Any:
        result = await arun(raw, op)
        for tx, first, last in written_ranges(result):
            events: list[RecordedEvent] = await arun(raw, _ops.read_range(tx, first, last))
            for event in events:
                for projection in self.inline_projections:
                    if projection.wants(event):
                        await projection.apply(raw, event)
        return result

    async def wait_for(self, position: Position | str, *, timeout: float = 10.0) -> None:
        position = _ops.checked_wait(position, timeout)
        deadline = time.monotonic() + timeout
        while await self._call(_ops.watermark(), None) <= position.tx:
            if time.monotonic() > deadline:
                raise TimeoutError(f"position {position} not visible after {timeout}s")
            await asyncio.sleep(0.002)

    async def load_state(
        self,
        stream_id: str,
        fold: Fold,
        *,
        use_snapshot: bool = True,
        conn: AsyncConn | None = None,
    ) -> FoldedState:
        op = load_state(self.tenant, stream_id, fold, use_snapshot)
        folded: FoldedState = await self._call(op, conn, atomic=True)
        return folded

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            await migrate.upgrade_async(conn)

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: ExpectedVersion | int = ExpectedVersion.ANY,
        actor: Mapping[str, Any] | None = None,
        traceparent: str | None = None,
        conn: AsyncConn | None = None,
    ) -> AppendResult:
        with append_span(stream_id, events) as span:
            op = _ops.append(
                self.settings,
                self.tenant,
                stream_id,
                events,
                expected_version,
                actor,
                traceparent or span.traceparent,
            )
            result: AppendResult = span.record(await self._call(op, conn, writes=True))
            return result

    async def append_many(
        self,
        appends: Iterable[StreamAppend],
        *,
        conditions: Iterable[StreamCondition] = (),
        actor: Mapping[str, Any] | None = None,
        traceparent: str | None = None,
        conn: AsyncConn | None = None,
    ) -> list[AppendResult]:
        op = _ops.append_many(self.settings, self.tenant, appends, conditions, actor, traceparent)
        results: list[AppendResult] = await self._call(op, conn, atomic=True, writes=True)
        return results

    async def check_version(
        self,
        stream_id: str,
        expected_version: ExpectedVersion | int,
        *,
        conn: AsyncConn | None = None,
    ) -> int:
        version: int = await self._call(
            _ops.check_version(self.tenant, stream_id, expected_version), conn
        )
        return version

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
        conn: AsyncConn | None = None,
    ) -> list[RecordedEvent]:
        op = _ops.read_stream(self.tenant, stream_id, from_version, limit, backwards)
        events: list[RecordedEvent] = await self._call(op, conn)
        return events

    async def read_all(
        self,
        *,
        after: Position | str | None = None,
        limit: int = 1000,
        types: Sequence[str] | None = None,
        conn: AsyncConn | None = None,
    ) -> Page:
        page: Page = await self._call(_ops.read_all(self.tenant, after, limit, types), conn)
        return page

    async def read_category(
        self,
        category: str,
        *,
        after: Position | str | None = None,
        limit: int = 1000,
        types: Sequence[str] | None = None,
        conn: AsyncConn | None = None,
    ) -> Page:
        op = _ops.read_category(self.tenant, category, after, limit, types)
        page: Page = await self._call(op, conn)
        return page

    async def stream_state(
        self, stream_id: str, *, conn: AsyncConn | None = None
    ) -> StreamState | None:
        state: StreamState | None = await self._call(
            _ops.stream_state(self.tenant, stream_id), conn
        )
        return state

    async def register(
        self, machine: type[Machine], *, conn: AsyncConn | None = None
    ) -> MachineRegistration:
        """Store a machine definition; the same definition again is a no-op."""
        registration: MachineRegistration = await self._call(_machine_ops.register(machine), conn)
        return registration

    async def create(
        self,
        stream_id: str,
        machine: type[Machine] | str,
        *,
        data: Mapping[str, Any] | None = None,
        actor: Mapping[str, Any] | None = None,
        event_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        traceparent: str | None = None,
        conn: AsyncConn | None = None,
    ) -> Instance:
        """Start an instance of ``machine`` in its initial state. Pass ``event_id`` to make
        a retried create return the first attempt's result."""
        op = _machine_ops.create(
            self.tenant,
            stream_id,
            machine,
            data,
            actor,
            event_id,
            causation_id,
            correlation_id,
            traceparent or current_traceparent(),
            max_data_bytes=self.settings.max_event_bytes,
        )
        instance: Instance = await self._call(op, conn, writes=True)
        return instance

    async def _transition(
        self,
        stream_id: str,
        event: str,
        conn: AsyncConn | None,
        *,
        raise_rejection: bool,
        options: dict[str, Any],
    ) -> TransitionResult:
        with transition_span(stream_id, event) as span:
            options["traceparent"] = options["traceparent"] or span.traceparent
            op = _machine_ops.transition(
                self.tenant,
                stream_id,
                event,
                raise_rejection=raise_rejection,
                max_data_bytes=self.settings.max_event_bytes,
                **options,
            )
            result: TransitionResult = span.record(await self._call(op, conn, writes=True))
            return result

    async def transition(
        self,
        stream_id: str,
        event: str,
        *,
        expected_state: str | None = None,
        expected_version: int | None = None,
        lease_epoch: int | None = None,
        idempotency_key: str | None = None,
        actor: Mapping[str, Any] | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        release_lease: bool = False,
        event_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        traceparent: str | None = None,
        record_as: str | None = None,
        conn: AsyncConn | None = None,
    ) -> TransitionResult:
        """Apply ``event`` to the instance, or raise the typed rejection. The stored
        event's type is ``record_as`` if given, else the event's name."""
        return await self._transition(
            stream_id, event, conn, raise_rejection=True, options=_transition_options(locals())
        )

    async def try_transition(
        self,
        stream_id: str,
        event: str,
        *,
        expected_state: str | None = None,
        expected_version: int | None = None,
        lease_epoch: int | None = None,
        idempotency_key: str | None = None,
        actor: Mapping[str, Any] | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        release_lease: bool = False,
        event_id: uuid.UUID | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
        traceparent: str | None = None,
        record_as: str | None = None,
        conn: AsyncConn | None = None,
    ) -> TransitionResult:
        """Like :meth:`transition`, but a rejection is returned (``outcome='rejected'``,
        the typed error in ``error``) and recorded for audit instead of raised."""
        return await self._transition(
            stream_id, event, conn, raise_rejection=False, options=_transition_options(locals())
        )

    async def acquire_lease(
        self, stream_id: str, owner: str, ttl: timedelta, *, conn: AsyncConn | None = None
    ) -> Lease:
        """Take (or, for the same owner, extend) the lease; a new owner gets a new epoch."""
        lease: Lease = await self._call(
            _machine_ops.acquire_lease(self.tenant, stream_id, owner, ttl), conn
        )
        return lease

    async def renew_lease(
        self, lease: Lease, ttl: timedelta, *, conn: AsyncConn | None = None
    ) -> Lease:
        """Extend a live lease; raises LeaseLost if it expired or changed hands."""
        op = _machine_ops.renew_lease(self.tenant, lease.stream_id, lease.owner, lease.epoch, ttl)
        renewed: Lease = await self._call(op, conn)
        return renewed

    async def release_lease(self, lease: Lease, *, conn: AsyncConn | None = None) -> None:
        """Give the lease up; raises LeaseLost if it changed hands meanwhile."""
        op = _machine_ops.release_lease(self.tenant, lease.stream_id, lease.owner, lease.epoch)
        await self._call(op, conn)

    async def fire_due_timeouts(
        self, limit: int = 100, *, conn: AsyncConn | None = None
    ) -> list[FiredTimeout]:
        """Fire the timeout edges of instances whose deadline passed (all tenants); safe
        to run from several workers at once."""
        fired: list[FiredTimeout] = await self._call(_machine_ops.fire_due_timeouts(limit), conn)
        return fired

    async def migrate_instances(
        self,
        machine: type[Machine] | str,
        from_version: int,
        to_version: int,
        state_map: Mapping[str, str],
        *,
        actor: Mapping[str, Any] | None = None,
        conn: AsyncConn | None = None,
    ) -> int:
        moved, after = 0, None
        while True:
            op = _machine_ops.migrate_instances(
                self.tenant, machine, from_version, to_version, state_map, actor, after
            )
            batch: tuple[int, str | None] = await self._call(op, conn, atomic=True)
            moved += batch[0]
            if batch[1] is None:  # a batch that found no instance left
                return moved
            after = batch[1]

    async def find_in_state(
        self,
        machine: type[Machine] | str,
        state: str,
        *,
        limit: int = 100,
        conn: AsyncConn | None = None,
    ) -> list[str]:
        """Ids of instances in ``state``, lowest first."""
        ids: list[str] = await self._call(
            _machine_ops.find_in_state(self.tenant, machine, state, limit), conn
        )
        return ids

    async def history(self, stream_id: str, *, conn: AsyncConn | None = None) -> History:
        """The stream's events and the rejected attempts on it."""
        found: History = await self._call(
            _machine_ops.history(self.tenant, stream_id), conn, atomic=True
        )
        return found
