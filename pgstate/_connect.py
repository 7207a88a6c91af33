"""Engines and connections: turn what the caller gives (URL, Engine, Connection, Session,
psycopg connection) into the psycopg connection an operation runs on."""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, create_engine, make_url
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pgstate.config import Settings
from pgstate.errors import InvalidInput

SyncConn = Connection | Session | psycopg.Connection[Any]
AsyncConn = AsyncConnection | AsyncSession | psycopg.AsyncConnection[Any]


def psycopg_url(url: str | URL) -> URL:
    """A SQLAlchemy URL on the psycopg 3 driver; plain ``postgresql://`` URLs are accepted."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise InvalidInput(
            f"pgstate needs PostgreSQL through psycopg 3, got {parsed.drivername!r}",
            detail={"field": "dsn"},
        )
    return parsed


def libpq_dsn(url: str | URL) -> str:
    """The same database as a libpq URI, for connections made outside SQLAlchemy."""
    parsed = psycopg_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def resolve_dsn(given: str | None, settings: Settings) -> str:
    dsn = given or settings.dsn
    if not dsn:
        raise InvalidInput(
            "no database given: pass a URL or an Engine, or set PGSTATE_DSN",
            detail={"field": "dsn"},
        )
    return dsn


def sync_engine(source: Engine | str | URL | None, settings: Settings) -> Engine:
    if isinstance(source, Engine):
        return source
    if isinstance(source, AsyncEngine):
        raise TypeError("an AsyncEngine goes with AsyncStore; Store takes an Engine or a URL")
    url = psycopg_url(source if source is not None else resolve_dsn(None, settings))
    return create_engine(url, pool_pre_ping=True)


def async_engine(source: AsyncEngine | str | URL | None, settings: Settings) -> AsyncEngine:
    if isinstance(source, AsyncEngine):
        return source
    if isinstance(source, Engine):
        raise TypeError("an Engine goes with Store; AsyncStore takes an AsyncEngine or a URL")
    url = psycopg_url(source if source is not None else resolve_dsn(None, settings))
    return create_async_engine(url, pool_pre_ping=True)


def raw_sync(conn: SyncConn) -> psycopg.Connection[Any]:
    """The caller's psycopg connection, inside the caller's transaction."""
    if isinstance(conn, psycopg.Connection):
        return conn
    if isinstance(conn, Session):
        conn = conn.connection()
    if isinstance(conn, Connection):
        # Begin in SQLAlchemy's terms too, so the caller's commit() commits our statements.
        if not conn.in_transaction():
            conn.begin()
        driver = conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise TypeError("pgstate needs a connection on the psycopg 3 driver")
        return driver
    raise TypeError(f"conn must be a SQLAlchemy Connection or Session, got {type(conn).__name__}")


async def raw_async(conn: AsyncConn) -> psycopg.AsyncConnection[Any]:
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if isinstance(conn, AsyncConnection):
        if not conn.in_transaction():
            await conn.begin()
        fairy = await conn.get_raw_connection()
        driver = fairy.driver_connection
        if not isinstance(driver, psycopg.AsyncConnection):
            raise TypeError("pgstate needs a connection on the psycopg 3 async driver")
        return driver
    raise TypeError(
        f"conn must be a SQLAlchemy AsyncConnection or AsyncSession, got {type(conn).__name__}"
    )
