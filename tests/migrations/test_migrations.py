"""Migrations: idempotent and safe to race, the schema files and the migration history build
the same catalog, a host application's Alembic runs pgstate's revisions, the DBA script holds
every migration, and the wheel carries everything needed to migrate and run."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine

from pgstate import NewEvent, Store
from pgstate._connect import psycopg_url
from pgstate._resources import alembic_dir, migration_files, schema_files, sql_dir
from pgstate.migrate import (
    apply_schema,
    check,
    current,
    head,
    sql_script,
    upgrade,
    versions_dir,
)
from pgstate.testing import cloned_database, database_url

REPO = Path(__file__).resolve().parents[2]

# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def empty_db(pgstate_server: str) -> Iterator[str]:
    """A database with nothing of pgstate in it (cloned from template0)."""
    with cloned_database(pgstate_server, "template0") as url:
        yield url


def engine_for(url: str) -> Engine:
    return create_engine(psycopg_url(url))


def installed_revision(url: str) -> str | None:
    engine = engine_for(url)
    try:
        return current(engine)
    finally:
        engine.dispose()


# Every catalog query is scoped to schema pgstate and ignores Alembic's version table.
CATALOG_QUERIES: dict[str, str] = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity,
               coalesce(c.reloptions::text, ''), coalesce(c.relacl::text, '')
          FROM pg_class c
         WHERE c.relnamespace = 'pgstate'::regnamespace
           AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
         ORDER BY 1""",
    "columns": """
        SELECT c.relname,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
               a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text,
               a.attgenerated::text, coalesce(a.attacl::text, '')
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'pgstate'::regnamespace
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND c.relname <> 'alembic_version'
           AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY 1, 2""",
    "constraints": """
        SELECT coalesce(c.relname, ''), k.conname, k.contype::text,
               pg_get_constraintdef(k.oid)
          FROM pg_constraint k
          LEFT JOIN pg_class c ON c.oid = k.conrelid
         WHERE k.connamespace = 'pgstate'::regnamespace
           AND coalesce(c.relname, '') <> 'alembic_version'
         ORDER BY 1, 2""",
    "indexes": """
        SELECT t.relname, i.relname, pg_get_indexdef(x.indexrelid)
          FROM pg_index x
          JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_class t ON t.oid = x.indrelid
         WHERE t.relnamespace = 'pgstate'::regnamespace
           AND t.relname <> 'alembic_version'
         ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prokind::text,
               CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) ELSE '' END,
               coalesce(p.proacl::text, '')
          FROM pg_proc p
         WHERE p.pronamespace = 'pgstate'::regnamespace
         ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
          FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'pgstate'::regnamespace AND NOT t.tgisinternal
         ORDER BY 1, 2""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid)
          FROM pg_class c
         WHERE c.relnamespace = 'pgstate'::regnamespace AND c.relkind IN ('v', 'm')
         ORDER BY 1""",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by, max_value, cycle
          FROM pg_sequences
         WHERE schemaname = 'pgstate'
         ORDER BY 1""",
    "types": """
        SELECT t.typname, t.typtype::text,
               coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                           FROM pg_enum e WHERE e.enumtypid = t.oid), ''),
               coalesce(format_type(t.typbasetype, t.typtypmod), '')
          FROM pg_type t
         WHERE t.typnamespace = 'pgstate'::regnamespace
           AND (t.typtype IN ('e', 'd', 'r', 'm')
                OR (t.typtype = 'c'
                    AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
         ORDER BY 1""",
    "schema": """
        SELECT n.nspname, coalesce(n.nspacl::text, '')
          FROM pg_namespace n WHERE n.nspname = 'pgstate'""",
}


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as connection:
        return {
            name: connection.execute(sql.encode()).fetchall()
            for name, sql in CATALOG_QUERIES.items()
        }


def object_ids(url: str) -> list[tuple[Any, ...]]:
    """Identity of every pgstate relation and function: changes if anything is recreated."""
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT 'rel', relname, oid::int8 FROM pg_class"
            " WHERE relnamespace = 'pgstate'::regnamespace"
            " UNION ALL SELECT 'proc', oid::regprocedure::text, oid::int8 FROM pg_proc"
            " WHERE pronamespace = 'pgstate'::regnamespace ORDER BY 1, 2"
        ).fetchall()


def assert_same_catalog(
    left: dict[str, list[tuple[Any, ...]]], right: dict[str, list[tuple[Any, ...]]]
) -> None:
    assert left["relations"], "the catalog query found no pgstate relations"
    for part in CATALOG_QUERIES:
        only_left = sorted(set(left[part]) - set(right[part]), key=repr)
        only_right = sorted(set(right[part]) - set(left[part]), key=repr)
        assert (part, only_left, only_right) == (part, [], []), part
        assert left[part] == right[part], part  # same order too (column positions)


def version_rows(url: str, table: str) -> list[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            f"SELECT version_num FROM {table} ORDER BY 1".encode()  # fixed test table names
        ).fetchall()
    return [row[0] for row in rows]


def append_and_read(url: str, stream: str) -> None:
    with Store(url) as store:
        result = store.append(stream, [NewEvent(type="Opened", data={"ok": True})])
        assert result.version == 1
        [event] = store.read_stream(stream)
        assert event.data == {"ok": True}


# --- (a) idempotent --------------------------------------------------------------------------


def test_migrate_twice_is_a_no_op(empty_db: str) -> None:
    engine = engine_for(empty_db)
    try:
        assert current(engine) is None
        assert check(engine) is False
        upgrade(engine)
        assert current(engine) == head()
        assert check(engine) is True
        append_and_read(empty_db, "order-1")
        catalog_before, ids_before = catalog(empty_db), object_ids(empty_db)

        upgrade(engine)
        with Store(engine) as store:
            store.migrate()  # the same path through the public API
        assert current(engine) == head()
        assert version_rows(empty_db, "pgstate.alembic_version") == [head()]
        assert catalog(empty_db) == catalog_before
        assert object_ids(empty_db) == ids_before  # nothing dropped and recreated
        with Store(empty_db) as store:
            assert [e.version for e in store.read_stream("order-1")] == [1]
    finally:
        engine.dispose()


def test_head_is_the_last_migration_file() -> None:
    last = migration_files()[-1].stem  # e.g. 0003_projections
    assert head() == f"pgstate_{last.split('_', 1)[0]}"


# --- (b) racing processes --------------------------------------------------------------------


def migrate_in_process(url: str, start: Any) -> None:
    """Run in a spawned process: wait for the other one, then migrate."""
    engine = create_engine(psycopg_url(url))
    try:
        with engine.connect():  # connect first, so the barrier releases two ready migrators
            pass
        start.wait(timeout=60)
        upgrade(engine)
    finally:
        engine.dispose()


def test_two_processes_migrate_at_once(
    empty_db: str, pgstate_server: str, pgstate_template: str
) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [
        context.Process(target=migrate_in_process, args=(empty_db, start)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    assert [process.exitcode for process in processes] == [0, 0]

    assert installed_revision(empty_db) == head()
    assert version_rows(empty_db, "pgstate.alembic_version") == [head()]
    assert_same_catalog(catalog(empty_db), catalog(database_url(pgstate_server, pgstate_template)))
    append_and_read(empty_db, "order-1")


# --- (c) schema files and migration history agree ---------------------------------------------


def test_schema_files_and_migrations_build_the_same_catalog(
    empty_db: str, pgstate_server: str, pgstate_template: str
) -> None:
    engine = engine_for(empty_db)
    try:
        with engine.begin() as connection:
            apply_schema(connection)
    finally:
        engine.dispose()
    from_schema = catalog(empty_db)
    from_migrations = catalog(database_url(pgstate_server, pgstate_template))
    assert_same_catalog(from_schema, from_migrations)
    append_and_read(empty_db, "order-1")  # and it works


def test_catalog_comparison_notices_a_difference(
    empty_db: str, pgstate_server: str, pgstate_template: str
) -> None:
    # The control for the test above: a one-column difference is caught.
    engine = engine_for(empty_db)
    try:
        with engine.begin() as connection:
            apply_schema(connection)
            connection.exec_driver_sql("ALTER TABLE pgstate.streams ADD COLUMN extra int")
    finally:
        engine.dispose()
    with pytest.raises(AssertionError, match="columns"):
        assert_same_catalog(
            catalog(empty_db), catalog(database_url(pgstate_server, pgstate_template))
        )


@pytest.mark.parametrize("from_schema", [False, True], ids=["history", "schema"])
def test_dba_script_builds_the_same_catalog(
    empty_db: str, pgstate_server: str, pgstate_template: str, from_schema: bool
) -> None:
    with psycopg.connect(empty_db) as connection:
        connection.execute(sql_script(from_schema=from_schema).encode())
    assert_same_catalog(catalog(empty_db), catalog(database_url(pgstate_server, pgstate_template)))
    # The script records what it installed, as Alembic would: `pgstate check` passes, and
    # `pgstate migrate` finds nothing to do instead of starting again at the first file.
    engine = engine_for(empty_db)
    try:
        assert current(engine) == head()
        assert check(engine)
        upgrade(engine)
        assert current(engine) == head()
    finally:
        engine.dispose()
    with Store(empty_db) as store:
        assert store.append("order-1", [NewEvent(type="Placed")]).version == 1


def test_offline_alembic_script_needs_no_database_and_builds_the_same_catalog(
    empty_db: str, pgstate_server: str, pgstate_template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`alembic upgrade heads --sql` on pgstate's own environment: written without a
    database (none is configured here), schema first, and it installs what
    `pgstate migrate` does."""
    import io

    from alembic import command
    from pgstate.migrate import alembic_config

    monkeypatch.delenv("PGSTATE_DSN", raising=False)
    config = alembic_config()
    config.output_buffer = io.StringIO()
    command.upgrade(config, "heads", sql=True)
    script = config.output_buffer.getvalue()
    assert script.index("CREATE SCHEMA IF NOT EXISTS pgstate") < script.index(
        "CREATE TABLE pgstate.alembic_version"
    )
    with psycopg.connect(empty_db) as connection:
        assert connection.execute("SELECT to_regnamespace('pgstate')").fetchone() == (None,)
        connection.execute(script.encode())
    assert_same_catalog(catalog(empty_db), catalog(database_url(pgstate_server, pgstate_template)))
    assert installed_revision(empty_db) == head()


# --- (d) a host application's Alembic ---------------------------------------------------------

HOST_ENV = """
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

HOST_ORDERS = '''
"""host 0001: the host application's own table."""
import sqlalchemy as sa
from alembic import op

revision = "host_0001"
down_revision = None
branch_labels = ("host",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_orders",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("total", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("host_orders")
'''

HOST_VIEW = '''
"""host 0002: a view over pgstate's log, so it must run after pgstate's first revision."""
from alembic import op

revision = "host_0002"
down_revision = "host_0001"
branch_labels = None
depends_on = "pgstate_0001"


def upgrade() -> None:
    op.execute(
        "CREATE VIEW host_event_counts AS"
        " SELECT stream_id, count(*) AS events FROM pgstate.events GROUP BY stream_id"
    )


def downgrade() -> None:
    op.execute("DROP VIEW host_event_counts")
'''


def write_host_project(root: Path, url: str) -> Path:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(textwrap.dedent(HOST_ENV))
    (versions / "host_0001_orders.py").write_text(HOST_ORDERS)
    (versions / "host_0002_view.py").write_text(HOST_VIEW)
    sqlalchemy_url = psycopg_url(url).render_as_string(hide_password=False)
    ini = root / "alembic.ini"
    ini.write_text(
        "[alembic]\n"
        "script_location = %(here)s/migrations\n"
        "path_separator = os\n"
        f"version_locations = %(here)s/migrations/versions{os.pathsep}{versions_dir()}\n"
        f"sqlalchemy.url = {sqlalchemy_url.replace('%', '%%')}\n"
    )
    return ini


def run_alembic(ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
    alembic = Path(sys.executable).with_name("alembic")
    completed = subprocess.run(
        [str(alembic), "-c", str(ini), *args],
        cwd=ini.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed


def test_host_alembic_runs_pgstate_revisions(empty_db: str, tmp_path: Path) -> None:
    ini = write_host_project(tmp_path, empty_db)
    heads = run_alembic(ini, "heads").stdout
    assert "host_0002" in heads and head() in heads

    run_alembic(ini, "upgrade", "heads")
    run_alembic(ini, "upgrade", "heads")  # the second run finds nothing to do

    # pgstate's version rows live in the host's version table, beside the host's own.
    assert version_rows(empty_db, "public.alembic_version") == sorted([head(), "host_0002"])
    with psycopg.connect(empty_db) as connection:
        tables = connection.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables"
            " WHERE table_schema IN ('public', 'pgstate') ORDER BY 1"
        ).fetchall()
    names = {row[0] for row in tables}
    assert {"pgstate.events", "pgstate.streams", "public.host_orders"} <= names
    assert "public.host_event_counts" in names

    append_and_read(empty_db, "order-1")
    with psycopg.connect(empty_db) as connection:
        counts = connection.execute("SELECT stream_id, events FROM host_event_counts").fetchall()
    assert counts == [("order-1", 1)]

    # pgstate's revisions are forward-only; the host downgrades its own branch by label.
    run_alembic(ini, "downgrade", "host@base")
    assert version_rows(empty_db, "public.alembic_version") == [head()]
    with psycopg.connect(empty_db) as connection:
        left = connection.execute(
            "SELECT to_regclass('public.host_orders'), to_regclass('pgstate.events')"
        ).fetchone()
    assert left == (None, "pgstate.events")


# --- (e) the DBA script ----------------------------------------------------------------------


def test_sql_script_contains_every_migration_in_order() -> None:
    script = sql_script()
    files = migration_files()
    assert files[0].name == "0001_initial.sql"
    offsets = []
    for path in files:
        body = path.read_text(encoding="utf-8")
        assert body.strip(), path.name
        assert f"-- {path.name}\n{body}" in script, path.name
        offsets.append(script.index(f"-- {path.name}\n"))
    assert offsets == sorted(offsets)
    assert len(script) >= sum(len(path.read_text(encoding="utf-8")) for path in files)


def test_sql_script_from_schema_contains_every_schema_file() -> None:
    script = sql_script(from_schema=True)
    files = schema_files()
    assert files
    for path in files:
        assert path.read_text(encoding="utf-8") in script, path.name


def test_every_migration_file_has_one_alembic_revision() -> None:
    revisions = sorted((alembic_dir() / "versions").glob("pgstate_*.py"))
    applied = []
    for path in revisions:
        text = path.read_text(encoding="utf-8")
        match = re.search(r'apply_migration\("([^"]+)"\)', text)
        assert match, path.name
        applied.append(match.group(1))
        number = match.group(1).split("_", 1)[0]
        assert f'revision = "pgstate_{number}"' in text, path.name
    assert applied == [path.stem for path in migration_files()]


# --- (f) the wheel ---------------------------------------------------------------------------


def build_wheel(out: Path) -> Path:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    [wheel] = out.glob("pgstate-*.whl")
    return wheel


WHEEL_CHILD = """
import json, sys
sys.path[:] = [p for p in sys.path if p]  # no implicit current directory entry
import pgstate, pgstate._resources as resources, pgstate.migrate as migrate
from sqlalchemy import create_engine
from pgstate import NewEvent, Store
from pgstate._connect import psycopg_url

url = sys.argv[1]
engine = create_engine(psycopg_url(url))
migrate.upgrade(engine)
with Store(engine) as store:
    result = store.append("wheel-1", [NewEvent(type="Installed", data={"from": "wheel"})])
    events = store.read_stream("wheel-1")
    print(json.dumps({
        "file": pgstate.__file__,
        "sql_dir": str(resources.sql_dir()),
        "alembic_dir": str(resources.alembic_dir()),
        "sys_path": sys.path,
        "current": migrate.current(engine),
        "head": migrate.head(),
        "version": result.version,
        "data": [e.data for e in events],
    }))
"""


def test_wheel_carries_sql_and_migrations_and_works(empty_db: str, tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {"pgstate/py.typed", "pgstate/_alembic/env.py", "pgstate/__init__.py"}
    for folder in ("schema", "migrations", "queries"):
        files = sorted((sql_dir() / folder).glob("*.sql"))
        assert files, folder
        expected |= {f"pgstate/_sql/{folder}/{f.name}" for f in files}
    expected |= {
        f"pgstate/_alembic/versions/{f.name}"
        for f in (alembic_dir() / "versions").glob("pgstate_*.py")
    }
    assert expected - names == set()
    assert not [n for n in names if n.startswith(("tests/", ".venv/", "sql/", "alembic/"))]

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PGSTATE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *sorted(dependencies)])
    env["PYTHONNOUSERSITE"] = "1"
    completed = subprocess.run(
        # -S: no site module, so the editable install's .pth (pointing at the checkout)
        # is not processed; dependencies come from PYTHONPATH only.
        [sys.executable, "-S", "-c", WHEEL_CHILD, empty_db],
        cwd=site,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site)
    assert Path(report["sql_dir"]) == site / "pgstate" / "_sql"
    assert Path(report["alembic_dir"]) == site / "pgstate" / "_alembic"
    assert str(REPO) not in report["sys_path"]
    assert report["current"] == report["head"] == head()
    assert report["version"] == 1
    assert report["data"] == [{"from": "wheel"}]


def test_0010_clears_deadlines_no_timeout_edge_can_fire(empty_db: str) -> None:
    """An instance that an earlier migrate_instances left with a deadline its state does
    not time (written directly here) loses it when 0010 runs; a timed state keeps its own."""
    from pgstate.machine import Machine, State

    class Plain(Machine):
        name = "PlainForMigration"
        waiting = State(initial=True)
        done = State(final=True)
        finish = waiting.to(done)

    class Timed(Machine):
        name = "TimedForMigration"
        waiting = State(initial=True, timeout=timedelta(hours=1), on_timeout="expire")
        done = State(final=True)
        expire = waiting.to(done)

    engine = engine_for(empty_db)
    try:
        upgrade(engine, "pgstate_0009")
        with Store(empty_db) as store:
            for machine, stream in ((Plain, "plain-1"), (Timed, "timed-1")):
                store.register(machine)
                store.create(stream, machine)
        with psycopg.connect(empty_db) as conn:
            conn.execute(
                "UPDATE pgstate.streams SET deadline_at = clock_timestamp() - interval '1 hour'"
                " WHERE stream_id = 'plain-1'"
            )
        upgrade(engine)
        assert current(engine) == head()
    finally:
        engine.dispose()
    with psycopg.connect(empty_db) as conn:
        deadlines: dict[str, bool] = dict(
            conn.execute(
                "SELECT stream_id, deadline_at IS NOT NULL FROM pgstate.streams ORDER BY 1"
            ).fetchall()
        )
    assert deadlines == {"plain-1": False, "timed-1": True}


def test_async_store_migrate_builds_the_same_catalog(
    empty_db: str, pgstate_server: str, pgstate_template: str
) -> None:
    """AsyncStore.migrate runs the same migrations on an async engine's connection; the
    schema it builds is the whole one, not just a version row."""
    import asyncio

    from pgstate import AsyncStore

    async def migrate_and_append() -> int:
        async with AsyncStore(empty_db) as astore:
            await astore.migrate()
            await astore.migrate()  # safe to run twice
            appended = await astore.append("order-1", [NewEvent(type="Placed")])
            return appended.version

    assert asyncio.run(migrate_and_append()) == 1
    assert_same_catalog(catalog(empty_db), catalog(database_url(pgstate_server, pgstate_template)))
    assert installed_revision(empty_db) == head()


def test_migrations_at_once_in_one_process(
    empty_db: str, pgstate_server: str, pgstate_template: str
) -> None:
    """Alembic's context is shared by the whole process: three threads and three tasks of
    one event loop migrating at once each wait for the other runs, none hangs or fails."""
    import asyncio
    import threading

    from pgstate import AsyncStore, Store

    async def three_tasks() -> None:
        stores = [AsyncStore(empty_db) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*(s.migrate() for s in stores)), timeout=120)
        for astore in stores:
            await astore.close()

    failures: list[BaseException] = []

    def in_thread() -> None:
        try:
            with Store(empty_db) as store:
                store.migrate()
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(3)]
    for thread in threads:
        thread.start()
    asyncio.run(three_tasks())
    for thread in threads:
        thread.join(timeout=120)
    assert failures == [] and not any(thread.is_alive() for thread in threads)
    assert version_rows(empty_db, "pgstate.alembic_version") == [head()]
    assert_same_catalog(catalog(empty_db), catalog(database_url(pgstate_server, pgstate_template)))


def test_migrations_on_one_event_loop_never_block_it(empty_db: str) -> None:
    """While another run holds the process's migration lock (held here directly), a task
    migrating through run_sync(upgrade_on_connection) waits without blocking the event
    loop, and a blocking Store.migrate() on the loop's thread refuses instead of waiting
    forever for a holder that needs the loop. Both hung before."""
    import asyncio
    import threading

    from sqlalchemy.ext.asyncio import create_async_engine

    from pgstate import Store
    from pgstate import migrate as migrations

    lock = migrations._ONE_RUN_AT_A_TIME  # the lock a concurrent run would hold
    refusals: list[str] = []

    async def through_run_sync() -> None:
        engine = create_async_engine(psycopg_url(empty_db))
        async with engine.begin() as conn:
            await conn.run_sync(migrations.upgrade_on_connection)
        await engine.dispose()

    async def scenario() -> None:
        assert lock.acquire(blocking=False)
        try:
            waiting = asyncio.create_task(through_run_sync())
            for _ in range(50):  # the loop keeps turning while the task waits
                await asyncio.sleep(0.002)
            assert not waiting.done()
            with Store(empty_db) as store:
                try:
                    store.migrate()
                except RuntimeError as refused:
                    refusals.append(str(refused))
        finally:
            lock.release()
        await waiting

    runner = threading.Thread(target=lambda: asyncio.run(scenario()), daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "a migration blocked its own event loop"
    assert len(refusals) == 1 and "await AsyncStore.migrate()" in refusals[0]
    assert installed_revision(empty_db) == head()


def test_0012_leaves_other_grantees_the_workers_claim_and_no_forced_one(empty_db: str) -> None:
    """A role granted the workers' claim directly before 0012 keeps it after the upgrade, and
    gets neither the forced claim nor the internal function both now share."""
    role = f"pgstate_test_grantee_{os.getpid()}"
    engine = engine_for(empty_db)
    try:
        upgrade(engine, "pgstate_0011")
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} NOLOGIN".encode())  # a name of the test's own
            conn.execute(f"GRANT USAGE ON SCHEMA pgstate TO {role}".encode())
            conn.execute(
                f"GRANT EXECUTE ON FUNCTION pgstate.claim_projection_v1(text, integer, integer,"
                f" text, bigint, boolean) TO {role}".encode()
            )
        upgrade(engine)
        assert current(engine) == head()
    finally:
        engine.dispose()
    try:
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute(f"SET ROLE {role}".encode())
            claimed = conn.execute(
                "SELECT o_epoch FROM pgstate.claim_projection_v1('p', 0, 1, 'w1', 60000, false)"
            ).fetchone()
            assert claimed == (1,)
            for forced in (
                "SELECT * FROM pgstate.claim_projection_v1('p', 0, 1, 'w2', 60000, true)",
                "SELECT * FROM pgstate.claim_projection('p', 0, 1, 'w2', 60000, true)",
                "SELECT * FROM pgstate.take_over_projection_v1('p', 0, 1, 'w2', 60000)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(forced.encode())
            conn.execute("RESET ROLE")
            owner = conn.execute(
                "SELECT owner, epoch FROM pgstate.checkpoints WHERE projection = 'p'"
            ).fetchone()
            assert owner == ("w1", 1)
    finally:
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}".encode())
            conn.execute(f"DROP ROLE {role}".encode())
