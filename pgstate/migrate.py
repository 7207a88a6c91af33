"""Schema migrations. The SQL lives in sql/migrations/; each Alembic revision
(alembic/versions/pgstate_NNNN_*.py) runs one file. pgstate's version table lives in schema
``pgstate``, so it never collides with the host application's."""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util import await_only

from alembic import command
from pgstate._connect import psycopg_url, resolve_dsn
from pgstate._resources import alembic_dir, migration_files, migration_sql, schema_files
from pgstate._sql import query
from pgstate.config import Settings

if TYPE_CHECKING:
    from pgstate.machine import Machine
    from pgstate.models import MachineRegistration

VERSION_TABLE = "alembic_version"
VERSION_SCHEMA = "pgstate"


def versions_dir() -> Path:
    """pgstate's Alembic revisions, for a host application's ``version_locations``."""
    return alembic_dir() / "versions"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(alembic_dir()))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(alembic_dir() / "versions"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


# Alembic's `context` and `op` are module-wide proxies, shared by every run in the process:
# two runs at once (threads, or tasks of one event loop) would each use the other's. The
# advisory lock in the environment serializes processes; this serializes one process.
_ONE_RUN_AT_A_TIME = threading.Lock()


def upgrade_on_connection(connection: Connection, target: str = "heads") -> None:
    """Upgrade inside the given connection's transaction (the caller commits)."""
    driver: Any = connection.connection.driver_connection
    if isinstance(driver, psycopg.AsyncConnection):
        # Inside run_sync, on the event loop's thread: wait without blocking the loop,
        # whose other task may hold the lock and need the loop to give it back.
        while not _ONE_RUN_AT_A_TIME.acquire(blocking=False):
            await_only(asyncio.sleep(0.01))
    elif not _ONE_RUN_AT_A_TIME.acquire(blocking=False):
        if _event_loop_runs_here():
            raise RuntimeError(
                "a pgstate migration is running in this thread's event loop: a blocking "
                "migrate() here would wait for it forever; await AsyncStore.migrate()"
            )
        _ONE_RUN_AT_A_TIME.acquire()
    try:
        _upgrade(connection, target)
    finally:
        _ONE_RUN_AT_A_TIME.release()


def _event_loop_runs_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _upgrade(connection: Connection, target: str) -> None:
    command.upgrade(alembic_config(connection), target)


async def upgrade_async(connection: AsyncConnection, target: str = "heads") -> None:
    """:func:`upgrade_on_connection` on an async connection (the caller commits)."""
    # Polled, not awaited in a thread: a task cancelled while it waits must not leave a
    # thread behind that takes the lock later and never gives it back.
    while not _ONE_RUN_AT_A_TIME.acquire(blocking=False):
        await asyncio.sleep(0.01)
    try:
        await connection.run_sync(_upgrade, target)
    finally:
        _ONE_RUN_AT_A_TIME.release()


def upgrade(engine: Engine, target: str = "heads") -> None:
    """Bring the database to ``target``. Safe to run twice and from two processes at once:
    an advisory lock serializes the runs, and the second finds nothing left to do."""
    with engine.begin() as connection:
        upgrade_on_connection(connection, target)


def current(engine: Engine) -> str | None:
    """The applied pgstate revision, or None for a database pgstate has never migrated."""
    with engine.connect() as connection:
        has_table = connection.dialect.has_table(connection, VERSION_TABLE, schema=VERSION_SCHEMA)
        if not has_table:
            return None
        from alembic.runtime.migration import MigrationContext

        context = MigrationContext.configure(
            connection,
            opts={"version_table": VERSION_TABLE, "version_table_schema": VERSION_SCHEMA},
        )
        heads = context.get_current_heads()
        return heads[0] if heads else None


def head() -> str:
    """The newest revision this version of pgstate ships."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:
        raise RuntimeError("pgstate ships no migrations")
    return revision


def check(engine: Engine) -> bool:
    """True when the database is at the newest revision."""
    return current(engine) == head()


def sql_script(from_schema: bool = False) -> str:
    """The whole install as one SQL script, for DBAs who apply SQL by hand: the migration
    history by default, or the current truth from sql/schema/."""
    files = schema_files() if from_schema else migration_files()
    parts = [f"-- {path.name}\n{path.read_text(encoding='utf-8')}" for path in files]
    revision = sql.SQL(query("record_installed_revision")).format(revision=sql.Literal(head()))
    parts.append(f"-- the installed revision\n{revision.as_string()}\n")
    return "\n".join(parts)


def execute_script(connection: Connection, sql: str) -> None:
    """Run a multi-statement SQL file on the connection's psycopg driver: without
    parameters psycopg neither parses placeholders nor splits the text."""
    driver: Any = connection.connection.driver_connection
    executed = driver.execute(sql)
    if inspect.isawaitable(executed):
        # An async engine's connection, inside run_sync (AsyncStore.migrate, or an async
        # Alembic environment): wait for it in the greenlet SQLAlchemy runs us in.
        await_only(executed)


def apply_schema(connection: Connection) -> None:
    """Build the schema from sql/schema/ directly (no Alembic); used to prove that the
    schema files and the migration history describe the same catalog."""
    for path in schema_files():
        execute_script(connection, path.read_text(encoding="utf-8"))


def apply_migration(name: str) -> None:
    """Run one migration file from inside an Alembic revision."""
    from alembic import op

    sql = migration_sql(name)
    if op.get_context().as_sql:
        op.execute(sql)
    else:
        execute_script(op.get_bind(), sql)


def run_environment(context: EnvironmentContext) -> None:
    """The body of alembic/env.py."""
    if context.is_offline_mode():
        _write_migrations(context)
        return
    connection: Connection | None = context.config.attributes.get("connection")
    if connection is None:
        url = context.config.get_main_option("sqlalchemy.url") or resolve_dsn(None, Settings())
        engine = create_engine(psycopg_url(url))
        with engine.connect() as own:
            _run_migrations(context, own)
            own.commit()
        engine.dispose()
    else:
        _run_migrations(context, connection)


def _write_migrations(context: EnvironmentContext) -> None:
    """Offline (``alembic upgrade --sql``): the script, with no database to connect to.
    Named parameters: with the driver's own (pyformat) every % of the SQL files would be
    written doubled."""
    _migrate(context, dialect_name="postgresql", dialect_opts={"paramstyle": "named"})


def _run_migrations(context: EnvironmentContext, connection: Connection) -> None:
    _migrate(context, connection=connection)


def _migrate(context: EnvironmentContext, **target: Any) -> None:
    context.configure(
        version_table=VERSION_TABLE,
        version_table_schema=VERSION_SCHEMA,
        transactional_ddl=True,
        **target,
    )
    with context.begin_transaction():
        # The lock is taken before Alembic reads its version table, so a second concurrent
        # run waits and then sees the first one's revision; the schema comes before that
        # table, which lives in it (an offline script creates both).
        context.execute(query("migration_lock"))
        context.execute(query("create_schema"))
        context.run_migrations()


def register_machine(connection: Connection, machine: type[Machine]) -> MachineRegistration:
    """Register a machine definition inside a migration's transaction, so a deploy's
    schema and machine versions land together::

        def upgrade() -> None:
            register_machine(op.get_bind(), Ticket)
    """
    from pgstate import _machine_ops
    from pgstate._connect import raw_sync
    from pgstate._driver import arun, run

    driver: Any = connection.connection.driver_connection
    if isinstance(driver, psycopg.AsyncConnection):
        # An async Alembic environment runs this inside run_sync: wait for the async call
        # in the greenlet SQLAlchemy runs us in, as execute_script does.
        registration: MachineRegistration = await_only(arun(driver, _machine_ops.register(machine)))
        return registration
    registration = run(raw_sync(connection), _machine_ops.register(machine))
    return registration
