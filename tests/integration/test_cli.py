"""The pgstate command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgstate.migrate import head
from pgstate.testing import cloned_database

PGSTATE = [sys.executable, "-m", "pgstate.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGSTATE, *args], capture_output=True, text=True, timeout=120)


def test_migrate_check_and_inspect(pgstate_server: str) -> None:
    with cloned_database(pgstate_server, "template0") as url:
        assert run("check", "--dsn", url).returncode == 1
        migrated = run("migrate", "--dsn", url)
        assert migrated.returncode == 0, migrated.stderr
        assert head() in migrated.stdout
        assert run("migrate", "--dsn", url).returncode == 0
        checked = run("check", "--dsn", url)
        assert checked.returncode == 0 and head() in checked.stdout
        missing = run("inspect", "nothing-here", "--dsn", url)
        assert missing.returncode == 1 and "no stream" in missing.stdout


def test_diagram_and_sql() -> None:
    mermaid = run("diagram", "pgstate.triage:Ticket")
    assert mermaid.returncode == 0
    assert mermaid.stdout.startswith("stateDiagram-v2\n    [*] --> new\n")
    assert "classifying --> new: give_up_classifying (after 5m)" in mermaid.stdout
    dot = run("diagram", "pgstate.triage:Ticket", "--format", "dot")
    assert '"resolved" [shape=doublecircle];' in dot.stdout
    bad = run("diagram", "pgstate.triage")
    assert bad.returncode != 0
    sql = run("sql")
    assert sql.returncode == 0
    for path in sorted((Path(__file__).parents[2] / "sql" / "migrations").glob("*.sql")):
        assert f"-- {path.name}" in sql.stdout


def test_worker_and_rebuild_commands(fresh_db: str) -> None:
    import asyncio
    import os

    import psycopg

    from pgstate import Store
    from pgstate._connect import libpq_dsn
    from pgstate.projection import wait_for_projection
    from pgstate.triage import Ticket

    examples = str(Path(__file__).parents[2] / "examples")
    env = {**os.environ, "PYTHONPATH": examples}
    store = Store(fresh_db)
    store.register(Ticket)
    created = [store.create(f"ticket-{n}", Ticket) for n in range(5)]
    worker = subprocess.Popen(
        [*PGSTATE, "worker", "ticket_board:board", "--relay", "--dsn", fresh_db],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        asyncio.run(wait_for_projection(fresh_db, "ticket_board", created[-1].position, timeout=30))
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    with psycopg.connect(libpq_dsn(fresh_db)) as conn:
        rows = conn.execute("SELECT ticket, state FROM ticket_board ORDER BY ticket").fetchall()
    assert rows == [(f"ticket-{n}", "new") for n in range(5)]
    rebuilt = subprocess.run(
        [*PGSTATE, "rebuild", "ticket_board:board", "--dsn", fresh_db],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "5/5 events" in rebuilt.stdout
    with psycopg.connect(libpq_dsn(fresh_db)) as conn:
        count = conn.execute("SELECT count(*) FROM ticket_board").fetchone()
    assert count == (5,)
    store.close()


@pytest.mark.parametrize("wake", ["poll", "auto"])
def test_relay_command_notifies_when_the_head_moves(fresh_db: str, wake: str) -> None:
    import signal

    import psycopg

    from pgstate import NewEvent, Store
    from pgstate._connect import libpq_dsn

    relay = subprocess.Popen(
        [*PGSTATE, "relay", "--dsn", fresh_db, "--interval", "0.005", "--wake", wake],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        banner = relay.stdout.readline()
        assert "connected" in banner
        if wake == "poll":
            assert "every 5 ms" in banner
        with psycopg.connect(libpq_dsn(fresh_db), autocommit=True) as listener:
            listener.execute("LISTEN pgstate_events")
            with Store(fresh_db) as store:
                result = store.append("relay-1", [NewEvent(type="Happened")])
            payloads = [n.payload for n in listener.notifies(timeout=5.0, stop_after=1)]
        # The relay names the head it saw: the event just committed.
        assert payloads == [str(result.last_position)]
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=10) == 0
