"""The only place pgstate talks to the database: drive a sans-IO operation on a psycopg
connection (sync or async) and translate errors."""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg
from psycopg.adapt import AdaptersMap
from psycopg.pq import ExecStatus, Format
from psycopg.pq.abc import PGresult
from psycopg.types.numeric import Int8BinaryLoader, IntLoader

from pgstate._ops import Op, Row
from pgstate.errors import translate

T = TypeVar("T")

_XID8_OID = 5069  # built-in type oid, fixed since PostgreSQL 13


def _prepare_adapters(adapters: AdaptersMap) -> None:
    # xid8 has no loader in psycopg; it is a 64-bit unsigned counter that fits an int8
    # for the next few hundred thousand years of transactions.
    if adapters.get_loader(_XID8_OID, Format.BINARY) is None:
        adapters.register_loader(_XID8_OID, Int8BinaryLoader)
        adapters.register_loader(_XID8_OID, IntLoader)


def _has_rows(result: PGresult | None) -> bool:
    # Cheaper than cursor.description, which builds a column object per column.
    return result is not None and result.status == ExecStatus.TUPLES_OK


def run(conn: psycopg.Connection[Any], op: Op, *, atomic: bool = False) -> Any:
    """Drive ``op`` on ``conn``. With ``atomic`` and an autocommit connection, the
    statements run in one transaction; otherwise they run in the connection's own."""
    _prepare_adapters(conn.adapters)
    try:
        if atomic and conn.autocommit:
            with conn.transaction():
                return _drive(conn, op)
        return _drive(conn, op)
    except psycopg.Error as exc:
        raise translate(exc) from exc


def _drive(conn: psycopg.Connection[Any], op: Op) -> Any:
    cursor = conn.cursor(binary=True)
    try:
        statement = next(op)
        while True:
            cursor.execute(statement.sql, statement.params)
            rows: list[Row] = cursor.fetchall() if _has_rows(cursor.pgresult) else []
            statement = op.send(rows)
    except StopIteration as stop:
        return stop.value
    finally:
        cursor.close()


async def arun(conn: psycopg.AsyncConnection[Any], op: Op, *, atomic: bool = False) -> Any:
    """The async twin of :func:`run`."""
    _prepare_adapters(conn.adapters)
    try:
        if atomic and conn.autocommit:
            async with conn.transaction():
                return await _adrive(conn, op)
        return await _adrive(conn, op)
    except psycopg.Error as exc:
        raise translate(exc) from exc


async def _adrive(conn: psycopg.AsyncConnection[Any], op: Op) -> Any:
    cursor = conn.cursor(binary=True)
    try:
        statement = next(op)
        while True:
            await cursor.execute(statement.sql, statement.params)
            rows: list[Row] = await cursor.fetchall() if _has_rows(cursor.pgresult) else []
            statement = op.send(rows)
    except StopIteration as stop:
        return stop.value
    finally:
        await cursor.close()
