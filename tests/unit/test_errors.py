"""The error registry against the SQL that raises the codes, and translate() on real driver
errors: rejections with JSON DETAIL, transient errors, and unknown errors keeping SQLSTATE.

The registry checks read sql/ only; the translate() checks need a real server, because the
point is what psycopg hands over for each kind of failure."""

from __future__ import annotations

import json
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from pgstate import NewEvent, Store
from pgstate._resources import sql_dir
from pgstate.errors import (
    REJECTIONS,
    ConnectionLost,
    DatabaseError,
    DeadlinePassed,
    DeadlockDetected,
    GuardRejected,
    IdempotencyKeyReused,
    IllegalTransition,
    InvalidInput,
    LeaseHeld,
    LeaseLost,
    LockTimeout,
    NotFound,
    PgStateError,
    Rejected,
    SerializationFailure,
    StaleState,
    TerminalState,
    TransientError,
    UnknownDefinition,
    VersionConflict,
    translate,
)

# The table of DESIGN.md section 4 ("Errors").
DESIGNED: dict[str, type[Rejected]] = {
    "SM001": NotFound,
    "SM002": IllegalTransition,
    "SM003": StaleState,
    "SM004": VersionConflict,
    "SM005": LeaseLost,
    "SM006": IdempotencyKeyReused,
    "SM007": DeadlinePassed,
    "SM008": TerminalState,
    "SM009": UnknownDefinition,
    "SM010": LeaseHeld,
    "SM011": GuardRejected,
    "SM012": InvalidInput,
}

_ANY_CODE = re.compile(r"\bSM\d{3}\b")
_QUOTED_CODE = re.compile(r"'(SM\d{3})'")
_LINE_COMMENT = re.compile(r"--[^\n]*")


def sql_files() -> list[Path]:
    files = sorted(sql_dir().rglob("*.sql"))
    assert files, f"no SQL files found under {sql_dir()}"
    return files


def codes_mentioned() -> dict[str, list[str]]:
    """Every SM code anywhere in sql/ (comments included), with the files naming it."""
    found: dict[str, list[str]] = {}
    for path in sql_files():
        for code in set(_ANY_CODE.findall(path.read_text(encoding="utf-8"))):
            found.setdefault(code, []).append(str(path.relative_to(sql_dir())))
    return found


def codes_raised() -> set[str]:
    """SM codes used as string literals in SQL code (comments stripped): raised with
    ERRCODE = '...', raise_error('...', ...), or assigned to a code that is raised."""
    raised: set[str] = set()
    for path in sql_files():
        code = _LINE_COMMENT.sub("", path.read_text(encoding="utf-8"))
        raised.update(_QUOTED_CODE.findall(code))
    return raised


# --- the registry ---------------------------------------------------------------------------


def test_registry_matches_the_design_table() -> None:
    assert REJECTIONS == DESIGNED
    for code, cls in REJECTIONS.items():
        assert cls.code == code
        assert cls.sqlstate == code
        assert issubclass(cls, Rejected)
        assert cls("x").sqlstate == code
        assert cls("x").retryable is False


def test_every_sm_code_in_sql_has_a_class() -> None:
    mentioned = codes_mentioned()
    assert "SM004" in mentioned and "SM012" in mentioned  # the scan itself works
    unknown = {code: files for code, files in mentioned.items() if code not in REJECTIONS}
    assert unknown == {}


def test_every_registered_code_is_raised_in_sql() -> None:
    missing = sorted(set(REJECTIONS) - codes_raised())
    assert missing == []


def test_invalid_input_is_a_value_error() -> None:
    error = InvalidInput("bad", detail={"field": "stream_id"})
    assert isinstance(error, ValueError)
    assert error.detail == {"field": "stream_id"}


# --- translate(): rejections and their DETAIL -------------------------------------------------


def raised_by(dsn: str, sql: Any, params: Any = None) -> psycopg.Error:
    """Run a statement that must fail and return the driver's exception."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        with pytest.raises(psycopg.Error) as caught:
            connection.execute(sql, params)
        return caught.value


@pytest.mark.parametrize("code", sorted(DESIGNED))
def test_rejection_attributes_come_from_json_detail(pgstate_db: str, code: str) -> None:
    head = {
        "tenant": "acme",
        "stream_id": "ticket-7",
        "category": "ticket",
        "version": 12,
        "state": "classifying",
        "lease_owner": "agent-3",
        "lease_epoch": 4,
        "deadline_at": "2030-01-02T03:04:05+00:00",
        "expected_version": 11,
        "expected_state": "new",
    }
    driver_error = raised_by(
        pgstate_db,
        "SELECT pgstate.raise_error(%s, %s, %s)",
        (code, f"refused with {code}", Jsonb(head)),
    )
    error = translate(driver_error)
    assert type(error) is DESIGNED[code]
    assert error.sqlstate == code
    assert error.message == f"refused with {code}"
    assert error.detail == head
    assert (error.tenant, error.stream_id) == ("acme", "ticket-7")
    assert (error.current_version, error.expected_version) == (12, 11)
    assert (error.current_state, error.expected_state) == ("classifying", "new")
    assert (error.lease_owner, error.lease_epoch) == ("agent-3", 4)
    assert error.deadline_at == "2030-01-02T03:04:05+00:00"


def test_real_version_conflict_detail_is_the_head_row(pgstate_db: str) -> None:
    stream = f"order-{uuid.uuid4().hex[:8]}"
    with Store(pgstate_db) as store:
        store.append(stream, [NewEvent(type="Opened"), NewEvent(type="Paid")])
    event_id = uuid.uuid4()
    driver_error = raised_by(
        pgstate_db,
        "SELECT * FROM pgstate.append_v1('default', %s, 1, %s, %s, %s, '{}', '{}', '{}', '{}',"
        " NULL, NULL)",
        (stream, [event_id], ["Shipped"], ["{}"]),
    )
    assert driver_error.diag.sqlstate == "SM004"
    assert json.loads(driver_error.diag.message_detail or "")["version"] == 2
    error = translate(driver_error)
    assert isinstance(error, VersionConflict)
    assert (error.stream_id, error.current_version, error.expected_version) == (stream, 2, 1)
    assert error.detail["category"] == "order"
    assert error.tenant == "default"


def test_detail_that_is_not_a_json_object(pgstate_db: str) -> None:
    plain = translate(
        raised_by(
            pgstate_db,
            "DO $$ BEGIN RAISE EXCEPTION 'gone' USING ERRCODE = 'SM001', DETAIL = 'no json';"
            " END $$",
        )
    )
    assert isinstance(plain, NotFound)
    assert plain.detail == {"text": "no json"}
    assert plain.current_version is None
    array = translate(
        raised_by(
            pgstate_db,
            "DO $$ BEGIN RAISE EXCEPTION 'gone' USING ERRCODE = 'SM001', DETAIL = '[1, 2]'; END $$",
        )
    )
    assert array.detail == {"value": [1, 2]}
    bare = translate(
        raised_by(pgstate_db, "DO $$ BEGIN RAISE EXCEPTION 'gone' USING ERRCODE = 'SM001'; END $$")
    )
    assert isinstance(bare, NotFound) and bare.detail == {}


def test_unique_backstop_on_event_id_is_idempotency_key_reused(pgstate_db: str) -> None:
    # Bypass append_v1 (as the owner may): the UNIQUE constraint still refuses, typed.
    with Store(pgstate_db) as store:
        event = NewEvent(type="Opened")
        store.append(f"dup-{uuid.uuid4().hex[:8]}", [event])
    driver_error = raised_by(
        pgstate_db,
        "INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data, event_id)"
        " VALUES ('default', 'other-1', 1, 'other', 'Opened', '{}', %s)",
        (event.event_id,),
    )
    error = translate(driver_error)
    assert isinstance(error, IdempotencyKeyReused)
    assert error.sqlstate == "23505"
    assert error.detail == {"constraint": "events_event_id_key"}


# --- translate(): other driver errors ----------------------------------------------------------


def test_unknown_error_keeps_its_sqlstate(pgstate_db: str) -> None:
    driver_error = raised_by(pgstate_db, "SELECT 1 / 0")
    assert isinstance(driver_error, psycopg.errors.DivisionByZero)
    error = translate(driver_error)
    assert type(error) is DatabaseError
    assert error.sqlstate == "22012"
    assert "division by zero" in error.message
    assert error.retryable is False


def test_foreign_unique_violation_is_not_a_rejection(pgstate_db: str) -> None:
    # Only pgstate's own unique keys are typed backstops; a host table's stays generic.
    with psycopg.connect(pgstate_db) as connection:
        connection.execute("CREATE TEMP TABLE host_orders (id int CONSTRAINT host_pk PRIMARY KEY)")
        connection.execute("INSERT INTO host_orders VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation) as caught:
            connection.execute("INSERT INTO host_orders VALUES (1)")
    error = translate(caught.value)
    assert type(error) is DatabaseError
    assert error.sqlstate == "23505"
    assert error.detail == {}


def test_translate_passes_pgstate_errors_through_and_wraps_others() -> None:
    original = LeaseHeld("held", detail={"lease_owner": "a"})
    assert translate(original) is original
    wrapped = translate(RuntimeError("boom"))
    assert type(wrapped) is DatabaseError
    assert wrapped.sqlstate is None
    assert wrapped.message == "boom"


def test_client_side_nul_is_invalid_input(pgstate_db: str) -> None:
    with psycopg.connect(pgstate_db) as connection, pytest.raises(psycopg.DataError) as caught:
        connection.execute("SELECT %s::text", ("a\x00b",))
    error = translate(caught.value)
    assert isinstance(error, InvalidInput)
    assert error.sqlstate == "SM012"


def test_lock_timeout_is_transient(pgstate_db: str) -> None:
    key = uuid.uuid4().int >> 65
    with psycopg.connect(pgstate_db) as holder, psycopg.connect(pgstate_db) as waiter:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        waiter.execute("SET lock_timeout = '20ms'")
        with pytest.raises(psycopg.Error) as caught:
            waiter.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        holder.rollback()
    error = translate(caught.value)
    assert type(error) is LockTimeout
    assert error.sqlstate == "55P03"
    assert isinstance(error, TransientError) and error.retryable is True


def test_serialization_failure_is_transient(pgstate_db: str) -> None:
    table = sql.Identifier(f"ser_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(pgstate_db, autocommit=True) as setup:
        setup.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)").format(table))
        setup.execute(sql.SQL("INSERT INTO {} VALUES (1, 0)").format(table))
    with psycopg.connect(pgstate_db) as reader, psycopg.connect(pgstate_db) as writer:
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reader.execute(sql.SQL("SELECT v FROM {}").format(table))  # takes the snapshot
        writer.execute(sql.SQL("UPDATE {} SET v = 1 WHERE id = 1").format(table))
        writer.commit()
        with pytest.raises(psycopg.Error) as caught:
            reader.execute(sql.SQL("UPDATE {} SET v = 2 WHERE id = 1").format(table))
        reader.rollback()
    error = translate(caught.value)
    assert type(error) is SerializationFailure
    assert error.sqlstate == "40001"
    assert error.retryable is True


def test_deadlock_is_transient(pgstate_db: str) -> None:
    first, second = uuid.uuid4().int >> 65, uuid.uuid4().int >> 65
    both_hold_one = threading.Barrier(2, timeout=60)

    def worker(own: int, other: int) -> PgStateError | None:
        with psycopg.connect(pgstate_db) as connection:
            connection.execute("SET statement_timeout = '60s'")  # a safety net only
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (own,))
            both_hold_one.wait()
            try:
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (other,))
            except psycopg.Error as exc:
                connection.rollback()
                return translate(exc)
            connection.rollback()
            return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(worker, first, second), pool.submit(worker, second, first)]
        outcomes = [future.result(timeout=120) for future in futures]
    errors = [outcome for outcome in outcomes if outcome is not None]
    assert len(errors) == 1, outcomes  # one victim; the other then gets its lock
    [error] = errors
    assert type(error) is DeadlockDetected
    assert error.sqlstate == "40P01"
    assert error.retryable is True


def test_terminated_connection_is_connection_lost(pgstate_db: str) -> None:
    with psycopg.connect(pgstate_db, autocommit=True) as victim:
        with psycopg.connect(pgstate_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("SELECT 1")
    error = translate(caught.value)
    assert type(error) is ConnectionLost
    # The commit's outcome is unknown: a blind retry could write twice.
    assert error.retryable is False
    assert not isinstance(error, TransientError)


def test_unreachable_server_is_connection_lost() -> None:
    import asyncio

    from pgstate import AsyncStore, ConnectionLost, Store

    url = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2"
    with Store(url) as store, pytest.raises(ConnectionLost):
        store.stream_state("any-1")

    async def attempt() -> None:
        async with AsyncStore(url) as astore:
            await astore.stream_state("any-1")

    with pytest.raises(ConnectionLost):
        asyncio.run(attempt())
