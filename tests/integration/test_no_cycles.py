"""A caught rejection leaves no reference cycle behind. Agents catch StaleState and
VersionConflict in their normal loop; an exception that stays reachable from its own
traceback (through a local variable of a raising frame) is freed only by the cyclic
garbage collector, which then runs more often in every process that races."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgstate
from pgstate import AsyncStore, InvalidInput, NewEvent, Rejected, Store, VersionConflict
from pgstate._connect import libpq_dsn
from pgstate.machine import Machine, State

PACKAGE = str(Path(pgstate.__file__).resolve().parent)
CALLS = 40


class Gate(Machine):
    closed = State(initial=True)
    open = State()
    gone = State(final=True)

    lift = closed.to(open)
    remove = open.to(gone)


def pgstate_tracebacks(garbage: list[Any]) -> list[types.TracebackType]:
    """Tracebacks through pgstate's own frames among the collector's finds."""
    return [
        found
        for found in garbage
        if isinstance(found, types.TracebackType)
        and found.tb_frame.f_code.co_filename.startswith(PACKAGE)
    ]


@contextlib.contextmanager
def garbage_kept() -> Iterator[list[types.TracebackType]]:
    """The collector off for the block, then one collection: the pgstate tracebacks it
    found unreachable go into the list this yields."""
    found: list[types.TracebackType] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(pgstate_tracebacks(gc.garbage))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.fixture
def conn(pgstate_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_dsn(pgstate_db), autocommit=True) as connection:
        yield connection


@pytest.fixture
def gates(store: Store, conn: psycopg.Connection[Any]) -> dict[str, str]:
    """An instance that left its initial state, one in its final state, and a plain
    stream at version 1; fresh ids for each test (the database is the module's)."""
    suffix = uuid.uuid4().hex[:12]
    ids = {name: f"{name}-{suffix}" for name in ("moved", "final", "plain")}
    store.register(Gate)
    store.create(ids["moved"], Gate, conn=conn)
    store.transition(ids["moved"], "lift", conn=conn)
    store.create(ids["final"], Gate, conn=conn)
    store.transition(ids["final"], "lift", conn=conn)
    store.transition(ids["final"], "remove", conn=conn)
    store.append(ids["plain"], [NewEvent(type="Made", data={})], conn=conn)
    return ids


def expect(error: type[Exception], call: Callable[[], object]) -> Callable[[], None]:
    def action() -> None:
        with pytest.raises(error):
            call()

    return action


@pytest.mark.parametrize(
    "case",
    ["stale state", "final state", "no instance", "version conflict", "bad input"],
)
def test_a_caught_error_leaves_no_cycle(
    store: Store, conn: psycopg.Connection[Any], gates: dict[str, str], case: str
) -> None:
    calls: dict[str, Callable[[], None]] = {
        "stale state": expect(
            Rejected,
            lambda: store.transition(gates["moved"], "lift", expected_state="closed", conn=conn),
        ),
        "final state": expect(
            Rejected, lambda: store.transition(gates["final"], "lift", conn=conn)
        ),
        "no instance": expect(Rejected, lambda: store.transition("gate-none", "lift", conn=conn)),
        "version conflict": expect(
            VersionConflict,
            lambda: store.append(
                gates["plain"], [NewEvent(type="Made", data={})], expected_version=0, conn=conn
            ),
        ),
        "bad input": expect(InvalidInput, lambda: store.transition("", "lift", conn=conn)),
    }
    with garbage_kept() as found:
        for _ in range(CALLS):
            calls[case]()
    assert found == []


def test_an_async_rejection_leaves_no_cycle(pgstate_db: str, gates: dict[str, str]) -> None:
    async def rejected_calls() -> list[types.TracebackType]:
        async with AsyncStore(pgstate_db) as store:
            connection = await psycopg.AsyncConnection.connect(
                libpq_dsn(pgstate_db), autocommit=True
            )
            try:
                with garbage_kept() as found:
                    for _ in range(CALLS):
                        with pytest.raises(Rejected):
                            await store.transition(
                                gates["moved"], "lift", expected_state="closed", conn=connection
                            )
                return found
            finally:
                await connection.close()

    assert asyncio.run(rejected_calls()) == []
