"""Store and AsyncStore: the public API. Both have the same method names and signatures;
each method is one line that hands a sans-IO operation from ``_ops`` to the driver."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from pgstate import _ops, migrate
from pgstate._connect import (
    AsyncConn,
    SyncConn,
    async_engine,
    raw_async,
    raw_sync,
    sync_engine,
)
from pgstate._driver import arun, run
from pgstate._ops import Op, check_identifier
from pgstate.config import Settings
from pgstate.models import (
    AppendResult,
    ExpectedVersion,
    NewEvent,
    Page,
    Position,
    RecordedEvent,
    StreamAppend,
    StreamCondition,
    StreamState,
)


class _StoreBase:
    def __init__(self, settings: Settings | None, tenant: str | None) -> None:
        self.settings = settings or Settings()
        self.tenant = check_identifier(tenant or self.settings.tenant, "tenant", 100)


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
    ) -> None:
        super().__init__(settings, tenant)
        self.engine = sync_engine(engine_or_url, self.settings)
        # Single-statement calls run in autocommit: one round trip, no BEGIN/COMMIT.
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def _call(self, op: Op, conn: SyncConn | None, *, atomic: bool = False) -> Any:
        if conn is not None:
            return run(raw_sync(conn), op, atomic=atomic)
        engine = self.engine if atomic else self._autocommit_engine
        with engine.connect() as own:
            result = run(raw_sync(own), op)
            own.commit()
            return result

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
        """Append events to one stream if it is at ``expected_version``."""
        op = _ops.append(
            self.settings, self.tenant, stream_id, events, expected_version, actor, traceparent
        )
        result: AppendResult = self._call(op, conn)
        return result

    def append_many(
        self,
        appends: Sequence[StreamAppend],
        *,
        conditions: Sequence[StreamCondition] = (),
        actor: Mapping[str, Any] | None = None,
        traceparent: str | None = None,
        conn: SyncConn | None = None,
    ) -> list[AppendResult]:
        """Append to several streams atomically, each at its expected version, while the
        ``conditions`` streams hold their expected versions."""
        op = _ops.append_many(self.settings, self.tenant, appends, conditions, actor, traceparent)
        results: list[AppendResult] = self._call(op, conn, atomic=True)
        return results

    def check_version(
        self,
        stream_id: str,
        expected_version: ExpectedVersion | int,
        *,
        conn: SyncConn | None = None,
    ) -> int:
        """Lock a stream until commit and check its version; returns the version."""
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


class AsyncStore(_StoreBase):
    """The asyncio twin of :class:`Store`: same names, same signatures, awaited."""

    def __init__(
        self,
        engine_or_url: AsyncEngine | str | URL | None = None,
        *,
        tenant: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        super().__init__(settings, tenant)
        self.engine = async_engine(engine_or_url, self.settings)
        self._autocommit_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    async def _call(self, op: Op, conn: AsyncConn | None, *, atomic: bool = False) -> Any:
        if conn is not None:
            return await arun(await raw_async(conn), op, atomic=atomic)
        engine = self.engine if atomic else self._autocommit_engine
        async with engine.connect() as own:
            result = await arun(await raw_async(own), op)
            await own.commit()
            return result

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(migrate.upgrade_on_connection)

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
        op = _ops.append(
            self.settings, self.tenant, stream_id, events, expected_version, actor, traceparent
        )
        result: AppendResult = await self._call(op, conn)
        return result

    async def append_many(
        self,
        appends: Sequence[StreamAppend],
        *,
        conditions: Sequence[StreamCondition] = (),
        actor: Mapping[str, Any] | None = None,
        traceparent: str | None = None,
        conn: AsyncConn | None = None,
    ) -> list[AppendResult]:
        op = _ops.append_many(self.settings, self.tenant, appends, conditions, actor, traceparent)
        results: list[AppendResult] = await self._call(op, conn, atomic=True)
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
