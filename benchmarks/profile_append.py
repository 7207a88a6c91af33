"""Where the time of one append goes, next to the peer harness's ``raw`` baseline.

Starts an embedded PostgreSQL (durable unless --no-fsync), then runs the same sequence of
single-event appends (each at its exact expected version, over 50 streams, as the
harness's append_distinct does) on one autocommit connection, three ways:

* ``raw``: the harness's raw driver statement (INSERT ... SELECT FROM unnest ... WHERE
  EXISTS) on a plain table with UNIQUE (stream_id, version);
* ``append_v1``: psycopg calling ``SELECT ... FROM pgstate.append_v1(...)`` directly, with
  the parameters pgstate sends (built once, outside the timed loop);
* ``store``: ``Store.append(..., conn=conn)``, the whole Python layer.

For each: wall time per call, client CPU per call (this process), and server CPU per call
(the backend process's utime + stime from /proc, so same machine only). On a 2-core box
running 8 workers, client + server CPU per append is what bounds the harness's figure.

    python benchmarks/profile_append.py [--calls 2000] [--no-fsync] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgstate import NewEvent, Store
from pgstate._connect import libpq_dsn
from pgstate._driver import _prepare_adapters
from pgstate._ops import append_statement

STREAMS = 50
VARIANT_NAMES = [
    ("raw INSERT (harness baseline)", "raw"),
    ("append_v1, psycopg direct", "direct"),
    ("store.append(conn=)", "store"),
    ("store.append, NewEvent prebuilt", "prebuilt"),
]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

RAW_SCHEMA = """
CREATE TABLE raw_events (
    position  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id text   NOT NULL,
    version   int    NOT NULL,
    type      text   NOT NULL,
    data      jsonb  NOT NULL,
    UNIQUE (stream_id, version)
)
"""
RAW_APPEND = """
INSERT INTO raw_events (stream_id, version, type, data)
SELECT %(s)s, %(base)s + x.ord, x.t, x.d
FROM unnest(%(types)s::text[], %(datas)s::jsonb[]) WITH ORDINALITY AS x(t, d, ord)
WHERE %(base)s = 0
   OR EXISTS (SELECT 1 FROM raw_events WHERE stream_id = %(s)s AND version = %(base)s)
RETURNING version
"""


def backend_cpu_s(pid: int) -> float:
    """utime + stime of a server process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(
    name: str, conn: psycopg.Connection[Any], calls: int, step: Callable[[int], object]
) -> tuple[str, float, float, float]:
    pid = conn.info.backend_pid
    server_before = backend_cpu_s(pid)
    client_before = time.process_time()
    started = time.perf_counter()
    for index in range(calls):
        step(index)
    wall = time.perf_counter() - started
    client = time.process_time() - client_before
    server = backend_cpu_s(pid) - server_before
    return name, wall / calls * 1e6, client / calls * 1e6, server / calls * 1e6


def event_data(index: int) -> dict[str, Any]:
    return {"worker": 0, "seq": index, "payload": "x" * 40}


def main(argv: list[str] | None = None) -> int:
    from pgstate._embedded import EmbeddedPostgres

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--no-fsync", action="store_true", help="isolate CPU from WAL flushes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true", help="profile the store loop")
    args = parser.parse_args(argv)
    server = EmbeddedPostgres(durable=not args.no_fsync).start()
    rows: list[tuple[str, float, float, float]] = []
    try:
        dsn = server.url()
        store = Store(dsn)
        store.migrate()
        with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
            conn.execute(RAW_SCHEMA)
            _prepare_adapters(conn.adapters)
            for _ in range(200):  # warm up caches, plans and the connection
                conn.execute("SELECT 1")

            def raw(prefix: str) -> Callable[[int], None]:
                def step(index: int) -> None:
                    params = {
                        "s": f"{prefix}-{index % STREAMS}",
                        "base": index // STREAMS,
                        "types": ["Appended"],
                        "datas": [Jsonb(event_data(index))],
                    }
                    if not conn.execute(RAW_APPEND, params).fetchall():
                        raise AssertionError("raw append refused")

                return step

            def direct(prefix: str) -> Callable[[int], None]:
                # Parameters exactly as Store.append sends them, built before timing.
                prepared = [
                    append_statement(
                        "default",
                        f"{prefix}-{index % STREAMS}",
                        [NewEvent(type="Appended", data=event_data(index))],
                        index // STREAMS,
                        None,
                        None,
                    )
                    for index in range(args.calls)
                ]
                cursor = conn.cursor(binary=True)

                def step(index: int) -> None:
                    statement = prepared[index]
                    cursor.execute(statement.sql, statement.params)
                    cursor.fetchall()

                return step

            def through_store(prefix: str) -> Callable[[int], None]:
                def step(index: int) -> None:
                    store.append(
                        f"{prefix}-{index % STREAMS}",
                        [NewEvent(type="Appended", data=event_data(index))],
                        expected_version=index // STREAMS,
                        conn=conn,
                    )

                return step

            def through_store_prebuilt(prefix: str) -> Callable[[int], None]:
                events = [NewEvent(type="Appended", data=event_data(i)) for i in range(args.calls)]

                def step(index: int) -> None:
                    store.append(
                        f"{prefix}-{index % STREAMS}",
                        [events[index]],
                        expected_version=index // STREAMS,
                        conn=conn,
                    )

                return step

            factories = {
                "raw": raw,
                "direct": direct,
                "store": through_store,
                "prebuilt": through_store_prebuilt,
            }
            variants = [(name, factories[key]) for name, key in VARIANT_NAMES]
            # Interleaved rounds, so a noisy neighbour hurts every variant alike.
            for round_number in range(args.rounds):
                for number, (name, factory) in enumerate(variants):
                    step = factory(f"r{round_number}v{number}")
                    rows.append(measure(name, conn, args.calls, step))
            if args.cprofile:
                profile = cProfile.Profile()
                profile.enable()
                for index in range(args.calls):
                    store.append(
                        f"cprof-{index % STREAMS}",
                        [NewEvent(type="Appended", data=event_data(index))],
                        expected_version=index // STREAMS,
                        conn=conn,
                    )
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(18)
        store.close()
    finally:
        server.stop()
    durability = "fsync off" if args.no_fsync else "durable (fsync on)"
    print(f"{args.calls} sequential single-event appends, one connection, {durability}")
    print(f"best of {args.rounds} interleaved rounds per column (noise only adds time)")
    print(f"{'variant':34s} {'wall us':>8s} {'client CPU us':>14s} {'server CPU us':>14s}")
    for name, _ in VARIANT_NAMES:
        mine = [row for row in rows if row[0] == name]
        wall, client, server_cpu = (min(row[i] for row in mine) for i in (1, 2, 3))
        print(f"{name:34s} {wall:8.0f} {client:14.0f} {server_cpu:14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
