"""The ``pgstate`` command: migrate | check | sql | diagram | inspect | timeouts | worker |
relay | rebuild | notify-mode | demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

import psycopg
from sqlalchemy.exc import ArgumentError, OperationalError

from pgstate import migrate as migrations
from pgstate._connect import psycopg_url, resolve_dsn
from pgstate._ops import check_interval
from pgstate.config import Settings
from pgstate.errors import ConnectionLost, InvalidInput, TransientError
from pgstate.listen import Relay
from pgstate.machine import Machine
from pgstate.projection import Projection, ProjectionWorker, rebuild

log = logging.getLogger("pgstate.cli")


def _dsn(args: argparse.Namespace) -> str:
    return resolve_dsn(args.dsn, Settings())


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    return create_engine(psycopg_url(_dsn(args)))


def cmd_migrate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    migrations.upgrade(engine)
    print(f"pgstate schema at {migrations.current(engine)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    engine = _engine(args)
    current, head = migrations.current(engine), migrations.head()
    print(f"database: {current or 'not installed'}; this pgstate: {head}")
    return 0 if current == head else 1


def cmd_sql(args: argparse.Namespace) -> int:
    sys.stdout.write(migrations.sql_script(from_schema=args.schema))
    return 0


def _resolve(target: str, example: str) -> object:
    """The object a MODULE:NAME argument names; a one-line exit message (status 2, as for
    any other bad argument) when the module or the name is not there."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        _bad_argument(f"give {target!r} as MODULE:NAME, e.g. {example}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as problem:
        _bad_argument(f"cannot import {module_name!r} (from {target!r}): {problem}")
    try:
        return getattr(module, attribute)
    except AttributeError:
        _bad_argument(f"module {module_name!r} has no {attribute!r} (from {target!r})")


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        return check_interval(value, "the interval")  # the bounds the library applies
    except InvalidInput:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most 3600 s: {text!r}"
        ) from None


def _not_negative_seconds(text: str) -> float:
    """An argparse type: 0 or a positive, finite number of seconds."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass  # _seconds says why
    return _seconds(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _bad_argument(message: str) -> NoReturn:
    print(f"pgstate: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_machine(target: str) -> type[Machine]:
    machine = _resolve(target, "pgstate.triage:Ticket")
    if not (isinstance(machine, type) and issubclass(machine, Machine)):
        _bad_argument(f"{target} is not a pgstate Machine")
    return machine


def cmd_diagram(args: argparse.Namespace) -> int:
    machine = load_machine(args.machine)
    render = machine.to_dot if args.format == "dot" else machine.to_mermaid
    sys.stdout.write(render())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pgstate.store import Store

    store = Store(_dsn(args), tenant=args.tenant)
    state = store.stream_state(args.stream)
    if state is None:
        print(f"no stream {args.stream}")
        return 1
    print(
        f"{state.stream_id}: version {state.version}, state {state.state}, machine "
        f"{state.machine} v{state.machine_version}, lease {state.lease_owner} "
        f"epoch {state.lease_epoch}, deadline {state.deadline_at}"
    )
    history = store.history(args.stream)
    for event in history.events:
        print(
            f"  v{event.version} {event.type} {event.data} "
            f"actor={event.actor} at {event.recorded_at}"
        )
    for rejection in history.rejections:
        print(f"  rejected {rejection.event}: {rejection.code} {rejection.message}")
    return 0


def cmd_timeouts(args: argparse.Namespace) -> int:
    from pgstate.store import Store

    stop = _stop_on_sigterm()
    with Store(_dsn(args)) as store, contextlib.suppress(KeyboardInterrupt):
        while not stop.is_set():
            try:
                fired = store.fire_due_timeouts(limit=args.batch)
            except (ConnectionLost, TransientError) as problem:
                if args.once:
                    raise
                log.warning("timeouts: %s; trying again in %g s", problem, args.interval)
                stop.wait(args.interval)
                continue
            for item in fired:
                print(
                    f"{item.tenant}/{item.stream_id}: {item.event}"
                    f" {item.from_state} -> {item.to_state}",
                    flush=True,
                )
            if args.once:
                return 0
            if len(fired) < args.batch:
                stop.wait(args.interval)
    return 0


def _stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM, so a long-running command stops cleanly under a service
    manager (Ctrl-C stops it through KeyboardInterrupt)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _load_projection(target: str) -> Projection:
    value = _resolve(target, "myapp.projections:order_totals")
    projection = value() if isinstance(value, type) else value
    if not isinstance(projection, Projection):
        _bad_argument(f"{target} is not a pgstate Projection")
    return projection


WAKE_CHOICES = ["auto", "wal", "poll"]
WAKE_HELP = (
    "wal: check when the server streams newly flushed log (a replication connection); "
    "poll (the default): every interval; auto: wal where the server allows it"
)


def cmd_relay(args: argparse.Namespace) -> int:
    """The notification relay alone, in its own process (no GIL shared with a worker)."""
    stop = _stop_on_sigterm()

    relay = Relay(_dsn(args), interval=args.interval, wake=args.wake, min_gap=args.min_gap)

    def connected() -> None:
        if relay.waking == "wal":
            how = "when the server streams newly flushed log"
        else:
            how = f"every {args.interval * 1000:g} ms"
            if relay.refusal:
                how += f" (no replication connection: {relay.refusal})"
        print(f"pgstate relay: connected, checking the head {how}")
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        relay.run(stop.is_set, connected)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Projections, the deadline sweeper and (in relay mode) the notification relay."""
    if not 0 <= args.member < args.members:
        _bad_argument(f"--member must be from 0 to {args.members - 1}, got {args.member}")
    dsn = _dsn(args)
    stop = _stop_on_sigterm()
    if args.relay:
        relay = Relay(dsn, interval=args.relay_interval, wake=args.relay_wake)
        threading.Thread(target=relay.run, args=(stop.is_set,), daemon=True).start()

    async def sweep() -> None:
        from pgstate.store import AsyncStore

        async with AsyncStore(dsn) as store:
            while not stop.is_set():
                try:
                    fired = await store.fire_due_timeouts(limit=100)
                except (ConnectionLost, TransientError) as problem:
                    # A database outage must not take the projections down with it.
                    log.warning("worker: deadline sweep: %s; trying again in 1 s", problem)
                    fired = []
                if len(fired) < 100:
                    await asyncio.sleep(1.0)

    async def main() -> None:
        workers = [
            ProjectionWorker(
                dsn, _load_projection(target), member=args.member, members=args.members
            )
            for target in args.projections
        ]
        tasks = [asyncio.create_task(worker.run(stop.is_set)) for worker in workers]
        if not args.no_timeouts:
            tasks.append(asyncio.create_task(sweep()))
        print(
            f"pgstate worker: {len(workers)} projection(s), relay {'on' if args.relay else 'off'}"
        )
        sys.stdout.flush()
        try:
            if tasks:
                await asyncio.gather(*tasks)
            else:  # only the relay runs, in its thread
                await asyncio.to_thread(stop.wait)
        finally:
            stop.set()
            # Give the leases up, so a successor need not wait for them to lapse.
            for worker in workers:
                with contextlib.suppress(Exception):
                    await worker.release()
                with contextlib.suppress(Exception):
                    await worker.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    projection = _load_projection(args.projection)

    def bar(done: int, total: int) -> None:
        width = 40
        filled = int(width * done / total) if total else width
        sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} events")
        sys.stdout.flush()

    position = asyncio.run(rebuild(_dsn(args), projection, progress=bar))
    print(f"\nrebuilt {projection.name} into {projection.table} up to {position}")
    return 0


def cmd_notify_mode(args: argparse.Namespace) -> int:
    import psycopg

    from pgstate._connect import libpq_dsn
    from pgstate.listen import set_notify_mode

    with psycopg.connect(libpq_dsn(_dsn(args)), autocommit=True) as conn:
        set_notify_mode(conn, args.mode)
    print(f"notify mode: {args.mode}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pgstate.demo import main as demo_main

    return demo_main(args.dsn or os.environ.get("PGSTATE_DSN"), args.tickets, args.agents)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgstate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_dsn(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--dsn", help="database URL (default: PGSTATE_DSN)")
        return sub

    with_dsn(commands.add_parser("migrate", help="bring the database to the newest schema"))
    with_dsn(commands.add_parser("check", help="exit 1 unless the schema is current"))
    sql = commands.add_parser("sql", help="print the install SQL for DBAs")
    sql.add_argument("--schema", action="store_true", help="the current schema, not the history")
    diagram = commands.add_parser("diagram", help="print a machine as Mermaid or DOT")
    diagram.add_argument("machine", help="MODULE:Class")
    diagram.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    inspect = with_dsn(commands.add_parser("inspect", help="show a stream's head and history"))
    inspect.add_argument("stream")
    inspect.add_argument("--tenant", default=None)
    timeouts = with_dsn(commands.add_parser("timeouts", help="fire due deadline edges"))
    timeouts.add_argument("--batch", type=_positive_int, default=100)
    timeouts.add_argument("--interval", type=_seconds, default=1.0)
    timeouts.add_argument("--once", action="store_true")
    worker = with_dsn(commands.add_parser("worker", help="run projections, sweeper, relay"))
    worker.add_argument("projections", nargs="*", help="MODULE:NAME of Projection objects")
    worker.add_argument("--member", type=int, default=0)
    worker.add_argument("--members", type=_positive_int, default=1)
    worker.add_argument("--relay", action="store_true", help="run the NOTIFY relay")
    worker.add_argument("--relay-interval", type=_seconds, default=0.002)
    worker.add_argument("--relay-wake", choices=WAKE_CHOICES, default="poll", help=WAKE_HELP)
    worker.add_argument("--no-timeouts", action="store_true", help="do not fire deadlines")
    relay = with_dsn(commands.add_parser("relay", help="run only the NOTIFY relay"))
    relay.add_argument("--interval", type=_seconds, default=0.002, help="seconds between checks")
    relay.add_argument("--wake", choices=WAKE_CHOICES, default="poll", help=WAKE_HELP)
    relay.add_argument(
        "--min-gap",
        type=_not_negative_seconds,
        default=0.0002,
        help="wal: seconds between two checks at least",
    )
    rebuild_cmd = with_dsn(commands.add_parser("rebuild", help="rebuild a projection's table"))
    rebuild_cmd.add_argument("projection", help="MODULE:NAME")
    mode = with_dsn(commands.add_parser("notify-mode", help="set how new events are signalled"))
    mode.add_argument("mode", choices=["commit", "relay"])
    demo = with_dsn(commands.add_parser("demo", help="multi-agent ticket triage"))
    demo.add_argument("--tickets", type=int, default=300)
    demo.add_argument("--agents", type=int, default=6)
    return parser


HANDLERS = {
    "migrate": cmd_migrate,
    "check": cmd_check,
    "sql": cmd_sql,
    "diagram": cmd_diagram,
    "inspect": cmd_inspect,
    "timeouts": cmd_timeouts,
    "demo": cmd_demo,
    "worker": cmd_worker,
    "relay": cmd_relay,
    "rebuild": cmd_rebuild,
    "notify-mode": cmd_notify_mode,
}


# Exit statuses besides 0: 1 is the command's own "no" (check: not current; inspect: no
# such stream), 2 a bad argument, 3 a database that cannot be reached or refused the work.
EXIT_BAD_ARGUMENT = 2
EXIT_DATABASE = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The long-running commands report trouble they keep retrying (a refused log stream, a
    # lost connection) as warnings of the pgstate loggers.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return HANDLERS[args.command](args)
    except (InvalidInput, ArgumentError) as problem:
        # A missing or malformed DSN, or input the server refused as invalid; not any
        # ValueError, which may be a bug in the user's projection (its traceback matters).
        return _one_line(problem, EXIT_BAD_ARGUMENT)
    except (ConnectionLost, psycopg.OperationalError, OperationalError) as problem:
        # The database cannot be reached. Any other error keeps its traceback: it may be a
        # bug in the user's projection or machine.
        return _one_line(problem, EXIT_DATABASE)


def _one_line(problem: BaseException, status: int) -> int:
    first = str(getattr(problem, "orig", None) or problem).strip().splitlines()
    print(f"pgstate: {first[0] if first else type(problem).__name__}", file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
