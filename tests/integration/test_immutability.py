"""The log is append-only: UPDATE, DELETE and TRUNCATE on pgstate.events are refused with
SQLSTATE SM012 whoever runs them, the superuser included, and the rows stay as they were.
The application roles cannot even try: they have no privilege to change the table."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgstate import InvalidInput, NewEvent, Store
from pgstate.errors import translate

MUTATIONS = {
    "update-all": "UPDATE pgstate.events SET data = '{\"forged\": true}'",
    "update-one": "UPDATE pgstate.events SET type = 'Forged' WHERE stream_id = 'ledger-1'"
    " AND version = 1",
    "update-noop": "UPDATE pgstate.events SET data = data WHERE version = 2",
    "delete-all": "DELETE FROM pgstate.events",
    "delete-one": "DELETE FROM pgstate.events WHERE stream_id = 'ledger-2'",
    "truncate": "TRUNCATE pgstate.events",
    "truncate-cascade": "TRUNCATE pgstate.events CASCADE",
    "truncate-with-streams": "TRUNCATE pgstate.streams, pgstate.events",
    "upsert": "INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data,"
    " event_id) SELECT tenant, stream_id, version, category, type, data, event_id"
    " FROM pgstate.events ON CONFLICT (event_id) DO UPDATE SET type = 'Forged'",
    "merge-update": "MERGE INTO pgstate.events e USING (SELECT 1 AS version) s"
    " ON e.version = s.version WHEN MATCHED THEN UPDATE SET type = 'Forged'",
    "merge-delete": "MERGE INTO pgstate.events e USING (SELECT 1 AS version) s"
    " ON e.version = s.version WHEN MATCHED THEN DELETE",
}


@pytest.fixture
def ledger(fresh_store: Store, fresh_db: str) -> Iterator[str]:
    """A database of the test's own holding four committed events; yields its URL."""
    fresh_store.append("ledger-1", [NewEvent(type="Opened", data={"n": i}) for i in range(3)])
    fresh_store.append("ledger-2", [NewEvent(type="Credited", data={"amount": 5})])
    yield fresh_db


def snapshot(connection: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    rows = connection.execute(
        "SELECT pos, tx::text, tenant, stream_id, version, type, data, metadata, event_id,"
        " recorded_at FROM pgstate.events ORDER BY pos"
    ).fetchall()
    assert len(rows) == 4
    return rows


def is_superuser(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute(
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("statement", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_mutation_is_rejected_even_for_the_superuser(ledger: str, statement: Any) -> None:
    with psycopg.connect(ledger, autocommit=True) as connection:
        if not is_superuser(connection):
            pytest.skip("the test server's user is not a superuser")
        before = snapshot(connection)
        with pytest.raises(psycopg.Error) as caught:
            connection.execute(statement)
        assert caught.value.diag.sqlstate == "SM012", caught.value.diag.message_primary
        assert "append-only" in (caught.value.diag.message_primary or "")
        assert snapshot(connection) == before
    error = translate(caught.value)
    assert isinstance(error, InvalidInput)


def test_rejection_names_the_operation(ledger: str) -> None:
    with psycopg.connect(ledger, autocommit=True) as connection:
        for operation, statement in [
            ("UPDATE", MUTATIONS["update-one"]),
            ("DELETE", MUTATIONS["delete-one"]),
            ("TRUNCATE", MUTATIONS["truncate"]),
        ]:
            with pytest.raises(psycopg.Error) as caught:
                connection.execute(statement)
            assert f"{operation} rejected" in (caught.value.diag.message_primary or "")


def test_mutation_inside_a_transaction_rolls_it_back(ledger: str) -> None:
    stream = f"side-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(ledger) as connection:
        before = snapshot(connection)
        connection.commit()
        connection.execute(
            "SELECT * FROM pgstate.append_v1('default', %s, 0, %s, '{Opened}', '{\"{}\"}',"
            " '{}', '{}', '{}', '{}', NULL, NULL)",
            (stream, [uuid.uuid4()]),
        )
        with pytest.raises(psycopg.Error):
            connection.execute(MUTATIONS["delete-all"])
        connection.rollback()
        assert snapshot(connection) == before


@pytest.mark.parametrize("role", ["pgstate_reader", "pgstate_writer"])
def test_application_roles_have_no_privilege_to_change_the_log(ledger: str, role: str) -> None:
    with psycopg.connect(ledger) as connection:
        exists = connection.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)
        ).fetchone()
        if not exists or exists[0] == 0:
            pytest.skip(f"role {role} was not created (migrated without CREATEROLE)")
        before = snapshot(connection)
        for statement in [
            MUTATIONS["update-one"],
            MUTATIONS["delete-one"],
            MUTATIONS["truncate"],
            "INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data,"
            " event_id) VALUES ('default', 'forged-1', 1, 'forged', 'Forged', '{}',"
            " gen_random_uuid())",
        ]:
            connection.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
            connection.rollback()
        assert snapshot(connection) == before


def test_writer_role_appends_through_the_function(ledger: str) -> None:
    with psycopg.connect(ledger) as connection:
        exists = connection.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'pgstate_writer'"
        ).fetchone()
        if not exists or exists[0] == 0:
            pytest.skip("role pgstate_writer was not created (migrated without CREATEROLE)")
        connection.execute("SET ROLE pgstate_writer")
        row = connection.execute(
            "SELECT from_version, to_version FROM pgstate.append_v1('default', 'ledger-1', 3,"
            " %s, '{Closed}', '{\"{}\"}', '{}', '{}', '{}', '{}', NULL, NULL)",
            ([uuid.uuid4()],),
        ).fetchone()
        assert row == (4, 4)
        connection.rollback()
