"""The only place pgstate talks to the database: drive a sans-IO operation on a psycopg
connection (sync or async) and translate errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.adapt import AdaptersMap
from psycopg.pq import ExecStatus, Format
from psycopg.pq.abc import PGresult
from psycopg.rows import TupleRow, tuple_row
from psycopg.types.json import set_json_loads
from psycopg.types.numeric import Int8BinaryLoader, IntLoader

from pgstate._json import loads
from pgstate._ops import Op, Row
from pgstate._sql import query
from pgstate.errors import translate

_XID8_OID = 5069  # built-in type oid, fixed since PostgreSQL 13

# The attribute of a connection that holds pgstate's idle cursor between calls.
_CURSOR_ATTRIBUTE = "_pgstate_cursor"
# The attribute of a caller's connection that holds the lock pgstate's calls on it take.
_LOCK_ATTRIBUTE = "_pgstate_call_lock"


def call_lock(conn: psycopg.Connection[Any]) -> threading.RLock:
    """One pgstate call at a time on a caller's connection. Threads sharing it would
    otherwise interleave the statements of two calls: one call's transaction block or
    savepoint would close over the other's writes (committing or rolling back work that
    is not its own). Reentrant: an inline projection may call pgstate on the connection
    it is given. setdefault on the instance dict is atomic."""
    lock: threading.RLock | None = vars(conn).get(_LOCK_ATTRIBUTE)
    if lock is None:
        lock = vars(conn).setdefault(_LOCK_ATTRIBUTE, threading.RLock())
    return lock


class _TaskLock:
    """A lock that the task holding it may take again (asyncio.Lock may not)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is not None and self._owner is task:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = task, 1

    async def __aexit__(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


def acall_lock(conn: psycopg.AsyncConnection[Any]) -> _TaskLock:
    """The async twin of :func:`call_lock`, for tasks sharing a connection."""
    lock: _TaskLock | None = vars(conn).get(_LOCK_ATTRIBUTE)
    if lock is None:
        lock = vars(conn).setdefault(_LOCK_ATTRIBUTE, _TaskLock())
    return lock


def _prepare_adapters(adapters: AdaptersMap) -> None:
    # xid8 has no loader in psycopg; it is a 64-bit unsigned counter that fits an int8
    # for the next few hundred thousand years of transactions. Registered whatever is
    # there already: these adapters are pgstate's own (its connections', or its cursor's
    # copy of a caller's), and the read path relies on tx coming back as an int.
    adapters.register_loader(_XID8_OID, Int8BinaryLoader)
    adapters.register_loader(_XID8_OID, IntLoader)


def _configure(cursor: psycopg.Cursor[TupleRow] | psycopg.AsyncCursor[TupleRow]) -> None:
    # Binary results, tuple rows and pgstate's own loaders whatever the caller configured
    # on the connection (a dict_row factory, other JSON loads): the operations unpack
    # tuples, and the adapters registered here stay on this cursor.
    cursor.format = Format.BINARY
    _prepare_adapters(cursor.adapters)
    set_json_loads(loads, cursor)


_KeptCursor = TypeVar("_KeptCursor", psycopg.Cursor[TupleRow], psycopg.AsyncCursor[TupleRow])


def _checkout(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], kind: type[_KeptCursor]
) -> _KeptCursor:
    """The connection's pgstate cursor, or a new one of ``kind``. A cursor keeps the
    parameter dumpers it looked up, so reusing one per connection spares that work on every
    call; taking it out of the connection (an atomic dict pop) means two threads or tasks
    sharing a connection never share a cursor. It holds its last result until the next
    call on the connection (at most one page of a read) and closes with the connection.
    The cursor and the connection refer to each other, so a connection the caller drops
    without closing it waits for the cycle collector (psycopg warns about that drop)."""
    cursor: _KeptCursor | None = vars(conn).pop(_CURSOR_ATTRIBUTE, None)
    if cursor is None or cursor.closed:
        # Each caller passes the cursor kind of its connection (sync or async).
        cursor = kind(conn, row_factory=tuple_row)  # type: ignore[call-overload]
        _configure(cursor)
    return cursor


def _has_rows(result: PGresult | None) -> bool:
    # Cheaper than cursor.description, which builds a column object per column.
    return result is not None and result.status == ExecStatus.TUPLES_OK


def run(conn: psycopg.Connection[Any], op: Op, *, atomic: bool = False) -> Any:
    """Drive ``op`` on ``conn``. With ``atomic`` and an autocommit connection, the
    statements run in one transaction; otherwise they run in the connection's own."""
    try:
        if atomic and conn.autocommit:
            with conn.transaction():
                return _drive(conn, op)
        return _drive(conn, op)
    except psycopg.Error as exc:
        raise translate(exc) from exc


def _drive(conn: psycopg.Connection[Any], op: Op) -> Any:
    cursor = _checkout(conn, psycopg.Cursor)
    try:
        statement = next(op)
        while True:
            cursor.execute(statement.sql, statement.params)
            rows: list[Row] = cursor.fetchall() if _has_rows(cursor.pgresult) else []
            statement = op.send(rows)
    except StopIteration as stop:
        return stop.value
    finally:
        vars(conn)[_CURSOR_ATTRIBUTE] = cursor


async def arun(conn: psycopg.AsyncConnection[Any], op: Op, *, atomic: bool = False) -> Any:
    """The async twin of :func:`run`."""
    try:
        if atomic and conn.autocommit:
            async with conn.transaction():
                return await _adrive(conn, op)
        return await _adrive(conn, op)
    except psycopg.Error as exc:
        raise translate(exc) from exc


async def _adrive(conn: psycopg.AsyncConnection[Any], op: Op) -> Any:
    cursor = _checkout(conn, psycopg.AsyncCursor)
    try:
        statement = next(op)
        while True:
            await cursor.execute(statement.sql, statement.params)
            rows: list[Row] = await cursor.fetchall() if _has_rows(cursor.pgresult) else []
            statement = op.send(rows)
    except StopIteration as stop:
        return stop.value
    finally:
        vars(conn)[_CURSOR_ATTRIBUTE] = cursor


# Not psycopg's transaction(): on a caller's connection whose transaction has not sent its
# first statement yet, that would BEGIN and COMMIT a transaction of its own, outside the
# caller's. A plain SAVEPOINT joins the caller's transaction, opening it if need be.
@contextmanager
def savepoint(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Run the block under a savepoint of the connection's transaction: on an error, what
    the block wrote leaves the transaction, which stays usable; the error goes on as it is."""
    _execute(conn, "savepoint_projected")
    try:
        yield
    except BaseException:
        _execute(conn, "rollback_to_projected")
        raise
    _execute(conn, "release_projected")


def _execute(conn: psycopg.Connection[Any], name: str) -> None:
    try:
        conn.execute(query(name))
    except psycopg.Error as exc:
        raise translate(exc) from exc


@asynccontextmanager
async def asavepoint(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """The async twin of :func:`savepoint`."""
    await _aexecute(conn, "savepoint_projected")
    try:
        yield
    except BaseException:
        await _aexecute(conn, "rollback_to_projected")
        raise
    await _aexecute(conn, "release_projected")


async def _aexecute(conn: psycopg.AsyncConnection[Any], name: str) -> None:
    try:
        await conn.execute(query(name))
    except psycopg.Error as exc:
        raise translate(exc) from exc
