"""The pgstate command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from pgstate.machine import Machine, State
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
    sql = run("sql")
    assert sql.returncode == 0
    for path in sorted((Path(__file__).parents[2] / "sql" / "migrations").glob("*.sql")):
        assert f"-- {path.name}" in sql.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("diagram", "pgstate.triage"), "as MODULE:NAME"),
        (("diagram", ":Ticket"), "as MODULE:NAME"),
        (("diagram", "no_such_module_here:Ticket"), "cannot import 'no_such_module_here'"),
        (("diagram", "pgstate.triage:NoSuchClass"), "has no 'NoSuchClass'"),
        (("diagram", "pgstate.triage:timedelta"), "is not a pgstate Machine"),
        (
            ("rebuild", "no_such_module_here:totals", "--dsn", "postgresql:///unused"),
            "cannot import",
        ),
        (
            ("rebuild", "pgstate.triage:Ticket", "--dsn", "postgresql:///unused"),
            "is not a pgstate Projection",
        ),
    ],
)
def test_a_bad_module_name_argument_is_one_line_not_a_traceback(
    args: tuple[str, ...], message: str
) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ("relay", "--interval", "-1"),
        ("relay", "--interval", "0"),
        ("relay", "--min-gap", "-0.1"),
        ("timeouts", "--interval", "nan"),
        ("timeouts", "--interval", "soon"),
        ("timeouts", "--batch", "0"),
        ("worker", "--relay-interval", "inf"),
    ],
)
def test_bad_intervals_and_batches_are_refused_before_anything_runs(args: tuple[str, ...]) -> None:
    result = run(*args, "--dsn", "postgresql:///unused")
    assert result.returncode == 2
    assert f"argument {args[1]}" in result.stderr


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("check",), 2, "no database given"),
        (("check", "--dsn", "mysql://db/app"), 2, "needs PostgreSQL through psycopg 3"),
        (("check", "--dsn", "postgresql://postgres@127.0.0.1:1/none"), 3, "connection"),
        (("inspect", "t-1", "--dsn", "postgresql://postgres@127.0.0.1:1/none"), 3, "connection"),
        (("timeouts", "--once", "--dsn", "postgresql://postgres@127.0.0.1:1/none"), 3, ""),
        (("worker", "--member", "2", "--members", "2"), 2, "--member must be from 0 to 1"),
    ],
)
def test_database_and_argument_trouble_is_one_line_with_its_own_status(
    args: tuple[str, ...], status: int, message: str
) -> None:
    """Scripts can tell "not current" (1) from a bad argument (2) and a database that cannot
    be reached (3)."""
    import os

    env = {key: value for key, value in os.environ.items() if key != "PGSTATE_DSN"}
    result = subprocess.run([*PGSTATE, *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith("pgstate: ") and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


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
    assert worker.returncode == 0, worker.stderr.read() if worker.stderr else ""
    with psycopg.connect(libpq_dsn(fresh_db)) as conn:
        rows = conn.execute("SELECT ticket, state FROM ticket_board ORDER BY ticket").fetchall()
        owners = conn.execute(
            "SELECT owner FROM pgstate.checkpoints WHERE projection = 'ticket_board'"
        ).fetchall()
    assert rows == [(f"ticket-{n}", "new") for n in range(5)]
    assert owners == [(None,)]  # stopped by SIGTERM, it gave its lease up
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


def test_a_worker_with_only_the_relay_keeps_running(fresh_db: str) -> None:
    worker = subprocess.Popen(
        [*PGSTATE, "worker", "--relay", "--no-timeouts", "--dsn", fresh_db],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().startswith("pgstate worker: 0 projection(s), relay on")
        # With nothing to gather, it used to return at once and take the relay with it.
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=2)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert worker.returncode == 0


class Blink(Machine):
    name = "CliBlink"
    on = State(initial=True, timeout=timedelta(milliseconds=100), on_timeout="expire")
    off = State(final=True)
    expire = on.to(off)


def test_the_timeouts_command_rides_out_a_database_outage(fresh_db: str) -> None:
    """Connections to its database refused for a while: the sweeper warns and goes on, and
    fires the next due deadline once the database is back."""
    from sqlalchemy.engine import make_url

    from pgstate import Store
    from pgstate._connect import libpq_dsn

    database = make_url(fresh_db).database
    admin_url = make_url(fresh_db).set(database="postgres").render_as_string(False)
    store = Store(fresh_db)
    store.register(Blink)
    sweeper = subprocess.Popen(
        [*PGSTATE, "timeouts", "--interval", "0.05", "--dsn", fresh_db],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    warned = threading.Event()

    def watch_warnings() -> None:
        assert sweeper.stderr is not None
        for line in sweeper.stderr:
            if "timeouts:" in line and "trying again" in line:
                warned.set()

    watcher = threading.Thread(target=watch_warnings, daemon=True)
    watcher.start()
    try:
        with psycopg.connect(libpq_dsn(admin_url), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            assert warned.wait(timeout=30), "the sweeper never reported the outage"
            assert sweeper.poll() is None  # still running
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        store.close()
        store = Store(fresh_db)
        store.create("blink-1", Blink)
        assert sweeper.stdout is not None
        fired = sweeper.stdout.readline()  # blocks until the sweeper fires the deadline
        assert fired.strip() == "default/blink-1: expire on -> off"
    finally:
        sweeper.terminate()
        sweeper.wait(timeout=30)
        store.close()
    assert sweeper.returncode == 0


BUGGY_PROJECTION = """
import psycopg
from pgstate.projection import Projection


class Buggy(Projection):
    name = "buggy"
    table = "buggy_rows"

    async def setup(self, conn, table):
        await conn.execute(psycopg.sql.SQL("CREATE TABLE {} (n int)").format(
            psycopg.sql.Identifier(table)))

    async def apply(self, conn, event, table):
        await conn.execute("SELECT 1 / 0")  # the projection's own bug


buggy = Buggy()
"""


def test_a_bug_in_the_users_projection_keeps_its_traceback(fresh_db: str, tmp_path: Path) -> None:
    """Exit 3 and one line are for a database that cannot be reached; an error raised by
    the projection's own SQL is a bug to read in full."""
    import os

    from pgstate import NewEvent, Store

    (tmp_path / "buggy_projection.py").write_text(BUGGY_PROJECTION)
    with Store(fresh_db) as store:
        store.append("order-1", [NewEvent(type="Placed")])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [*PGSTATE, "rebuild", "buggy_projection:buggy", "--dsn", fresh_db],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "DivisionByZero" in result.stderr
