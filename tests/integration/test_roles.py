"""Who may call what. pgstate_writer (the application) writes, reads, leases, runs workers
and the sweeper, and registers machines; the operator's calls, which change what those
calls enforce, need pgstate_admin: instance migrations, the notification mode, unparking an
event, and a rebuild's forced claim of a projection. A refused call changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from pgstate import NewEvent, PermissionDenied, RecordedEvent, Store
from pgstate.listen import set_notify_mode
from pgstate.machine import Machine, State
from pgstate.projection import Projection, ProjectionWorker, rebuild

OPERATOR_CALLS = {
    "migrate_instances": "SELECT * FROM pgstate.migrate_instances_v1('default', %(machine)s,"
    " 1, 2, '{}', NULL, NULL, 100)",
    "set_notify_mode": "SELECT pgstate.set_notify_mode_v1('commit')",
    "unpark_event": "SELECT pgstate.unpark_event_v1('p', '1'::xid8, 1)",
    "take_over_projection": "SELECT * FROM pgstate.take_over_projection_v1('p', 0, 1, 'me', 60000)",
    "forced_claim": "SELECT * FROM pgstate.claim_projection_v1('p', 0, 1, 'me', 60000, true)",
    "internal_claim": "SELECT * FROM pgstate.claim_projection('p', 0, 1, 'me', 60000, true)",
}


def worker_machine(name: str, *, second: bool) -> type[Machine]:
    """Two versions of one machine: the second renames 'busy' to 'working'."""
    idle = State(initial=True)
    busy = State()
    namespace: dict[str, Any] = {"name": name, "idle": idle}
    namespace["working" if second else "busy"] = busy
    namespace["start"] = idle.to(busy)
    return type("Worker", (Machine,), namespace)


def busy_job_with_a_second_version(store: Store) -> str:
    """Registers a machine of its own, puts instance job-1 in 'busy' on version 1, then
    registers version 2; returns the machine's name."""
    name = f"Worker{uuid.uuid4().hex[:8]}"
    store.register(worker_machine(name, second=False))
    store.create("job-1", name)
    store.transition("job-1", "start")
    store.register(worker_machine(name, second=True))
    return name


def role_exists(connection: psycopg.Connection[Any], role: str) -> bool:
    row = connection.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,))
    found = row.fetchone()
    return bool(found and found[0])


@pytest.fixture
def as_role(fresh_db: str) -> Iterator[Any]:
    """Connections of the test's own database that act as a role (SET ROLE); skips where
    the migration could not create the roles."""
    opened: list[psycopg.Connection[Any]] = []

    def connect(role: str) -> psycopg.Connection[Any]:
        connection = psycopg.connect(fresh_db, autocommit=True)
        opened.append(connection)
        if not role_exists(connection, role):
            pytest.skip(f"role {role} was not created (migrated without CREATEROLE)")
        connection.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        return connection

    yield connect
    for connection in opened:
        connection.close()


def state_of_the_catalog(fresh_db: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(fresh_db) as connection:
        return connection.execute(
            "SELECT 'stream', stream_id, state, machine_version::text, version::text"
            "  FROM pgstate.streams"
            " UNION ALL SELECT 'checkpoint', projection, owner, epoch::text, member::text"
            "  FROM pgstate.checkpoints"
            " UNION ALL SELECT 'config', key, value::text, NULL, NULL FROM pgstate.config"
            " UNION ALL SELECT 'trigger', tgname, tgenabled::text, NULL, NULL FROM pg_trigger"
            "  WHERE tgrelid = 'pgstate.events'::regclass AND NOT tgisinternal"
            " ORDER BY 1, 2"
        ).fetchall()


@pytest.mark.parametrize("call", sorted(OPERATOR_CALLS))
def test_the_writer_role_may_not_make_the_operators_calls(
    fresh_store: Store, fresh_db: str, as_role: Any, call: str
) -> None:
    name = busy_job_with_a_second_version(fresh_store)
    before = state_of_the_catalog(fresh_db)
    writer = as_role("pgstate_writer")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        writer.execute(OPERATOR_CALLS[call], {"machine": name})
    assert state_of_the_catalog(fresh_db) == before


def test_refusals_reach_the_api_as_permission_denied(
    fresh_store: Store, fresh_db: str, as_role: Any
) -> None:
    name = busy_job_with_a_second_version(fresh_store)
    before = state_of_the_catalog(fresh_db)
    writer = as_role("pgstate_writer")
    with pytest.raises(PermissionDenied) as refused:
        fresh_store.migrate_instances(name, 1, 2, {"busy": "working"}, conn=writer)
    assert refused.value.sqlstate == "42501"
    with pytest.raises(PermissionDenied):
        set_notify_mode(writer, "commit")
    assert state_of_the_catalog(fresh_db) == before


def test_the_writer_role_keeps_what_the_application_needs(fresh_store: Store, as_role: Any) -> None:
    writer = as_role("pgstate_writer")
    name = f"Worker{uuid.uuid4().hex[:8]}"
    registration = fresh_store.register(worker_machine(name, second=False), conn=writer)
    assert registration.version == 1
    fresh_store.create("job-1", name, conn=writer)
    assert fresh_store.transition("job-1", "start", conn=writer).to_state == "busy"
    appended = fresh_store.append("plain-1", [NewEvent(type="Noted")], conn=writer)
    assert appended.version == 1
    assert [e.type for e in fresh_store.read_stream("plain-1", conn=writer)] == ["Noted"]
    # A worker's own claim, without force, is the writer's.
    row = writer.execute(
        "SELECT o_epoch FROM pgstate.claim_projection_v1('p', 0, 1, 'me', 60000, false)"
    ).fetchone()
    assert row == (1,)


def test_the_admin_role_makes_the_operators_calls(fresh_store: Store, as_role: Any) -> None:
    name = busy_job_with_a_second_version(fresh_store)
    admin = as_role("pgstate_admin")
    assert fresh_store.migrate_instances(name, 1, 2, {"busy": "working"}, conn=admin) == 1
    head = fresh_store.stream_state("job-1")
    assert head is not None and (head.state, head.machine_version) == ("working", 2)
    set_notify_mode(admin, "relay")
    first = admin.execute(
        "SELECT o_epoch FROM pgstate.claim_projection_v1('p', 0, 1, 'worker', 60000, false)"
    ).fetchone()
    taken = admin.execute(
        "SELECT o_epoch FROM pgstate.take_over_projection_v1('p', 0, 1, 'rebuild', 60000)"
    ).fetchone()
    assert first == (1,) and taken == (2,)
    unparked = admin.execute("SELECT pgstate.unpark_event_v1('p', '1'::xid8, 1)").fetchone()
    assert unparked == (False,)


class Tally(Projection):
    """Counts events per stream; an event whose data has "poison" fails."""

    name = "tally"
    table = "tally"

    async def setup(self, conn: psycopg.AsyncConnection[Any], table: str) -> None:
        await conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (stream_id text PRIMARY KEY, seen int)").format(
                sql.Identifier(table)
            )
        )

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        if event.data.get("poison"):
            raise ValueError("cannot handle it")
        await conn.execute(
            sql.SQL(
                "INSERT INTO {t} VALUES (%s, 1)"
                " ON CONFLICT (stream_id) DO UPDATE SET seen = {t}.seen + 1"
            ).format(t=sql.Identifier(table)),
            (event.stream_id,),
        )


def as_role_url(url: str, role: str) -> str:
    """The database's URL for sessions that start as ``role`` (libpq's options)."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-crole={role}')}"


def test_a_writers_worker_parks_but_may_not_unpark_or_rebuild(
    fresh_store: Store, fresh_db: str, as_role: Any
) -> None:
    owner = as_role("pgstate_writer")
    owner.execute("RESET ROLE")
    owner.execute("GRANT CREATE ON SCHEMA public TO pgstate_writer")
    fresh_store.append(
        "acct-1", [NewEvent(type="Added"), NewEvent(type="Added", data={"poison": 1})]
    )
    writer_url = as_role_url(fresh_db, "pgstate_writer")

    async def scenario() -> None:
        worker = ProjectionWorker(writer_url, Tally(), max_attempts=1)
        try:
            for _ in range(5):
                await worker.run_once()
            parked = await worker.parked_events()
            assert len(parked) == 1
            with pytest.raises(PermissionDenied):
                await worker.retry_parked()
            assert await worker.parked_events() == parked
            before = state_of_the_catalog(fresh_db)
            with pytest.raises(PermissionDenied):
                await rebuild(writer_url, Tally())
            assert state_of_the_catalog(fresh_db) == before
        finally:
            await worker.close()

    asyncio.run(scenario())
    with psycopg.connect(fresh_db) as connection:
        assert connection.execute("SELECT * FROM tally").fetchall() == [("acct-1", 1)]
        shadow = connection.execute("SELECT to_regclass('tally__rebuild')").fetchone()
        assert shadow == (None,)
