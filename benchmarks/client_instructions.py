"""Client instructions per call, counted by valgrind: what pgstate's Python side (pgstate,
psycopg, the interpreter) costs per operation, beside the same operation written the way
the peer harness's raw driver writes it. The server's side is ``instructions.py``.

In the peer harness the clients and the server share the machine's cores, so every
instruction a client spends is one the server does not get. Timings on a shared machine
move by ±20 %; instruction counts come back the same on every run.

Starts an embedded PostgreSQL (not durable: the client's count does not depend on it),
then runs each variant in a child process under ``valgrind --tool=callgrind``, once with
N1 and once with N2 calls, and reports (instructions at N2 - at N1) / (N2 - N1), which
cancels the interpreter's start-up, the imports and the connection.

    python benchmarks/client_instructions.py [--calls 100,600] [--only pgstate_transition]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import uuid
from typing import Any

import psycopg
from instructions import RAW_SCHEMA  # the harness's raw tables, as the server count uses
from psycopg.types.json import Jsonb
from scale import Toggle, toggle_store  # the machine and set-up profile_transition.py uses too

from pgstate import NewEvent, StaleState, Store, VersionConflict
from pgstate._connect import libpq_dsn
from pgstate._embedded import EmbeddedPostgres

INSTANCES = 100
READ_PAGE = 1000
PAGES_PER_CALLS = 50  # the read variants run calls / 50 pages: N1=100 reads 2,000 events
BATCH = 100  # the harness fills its read_back streams 100 events at a time

# As the harness's raw driver sends them (../shared/bench/drivers/raw.py).
RAW_TRANSITION_AND_RECORD = """
WITH t AS (
    UPDATE tickets SET state = %(to)s WHERE id = %(id)s AND state = %(from)s RETURNING id
)
INSERT INTO events (stream_id, version, type, data)
SELECT %(s)s,
       coalesce((SELECT max(version) FROM events WHERE stream_id = %(s)s), 0) + 1,
       %(type)s, %(data)s
FROM t
RETURNING version
"""
RAW_APPEND_EXPECTED = """
INSERT INTO events (stream_id, version, type, data)
SELECT %(s)s, %(base)s + x.ord, x.t, x.d
FROM unnest(%(types)s::text[], %(datas)s::jsonb[]) WITH ORDINALITY AS x(t, d, ord)
WHERE %(base)s = 0
   OR EXISTS (SELECT 1 FROM events WHERE stream_id = %(s)s AND version = %(base)s)
RETURNING version
"""
RAW_CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = %s"
RAW_APPEND_ANY = """
INSERT INTO events (stream_id, version, type, data)
SELECT %(s)s, b.v + x.ord, x.t, x.d
FROM (SELECT coalesce(max(version), 0) AS v FROM events WHERE stream_id = %(s)s) b,
     unnest(%(types)s::text[], %(datas)s::jsonb[]) WITH ORDINALITY AS x(t, d, ord)
RETURNING version
"""
RAW_READ_ALL = (
    "SELECT position, stream_id, version, type, data FROM events "
    "WHERE position > %s ORDER BY position LIMIT %s"
)


VARIANTS = {
    "raw_transition": "UPDATE ... RETURNING + INSERT of its event, one statement (harness raw)",
    "pgstate_transition": "Store.transition with expected_state, data and record_as",
    "raw_transition_lost": "the same UPDATE when the state moved on (no row)",
    "pgstate_transition_lost": "Store.transition refused with StaleState, caught",
    "raw_append": "INSERT of one event at the stream's end (harness raw, expected any)",
    "pgstate_append": "Store.append of one NewEvent built from a dict (as the peer driver)",
    "raw_append_conflict": "INSERT at version 1 of a stream already there, then its version",
    "pgstate_append_conflict": "Store.append at version 1 of a stream already there, caught",
    "raw_batch_event": f"append of {BATCH} events at once, per event (harness raw, as its fill)",
    "pgstate_batch_event": f"Store.append of {BATCH} NewEvents built from dicts, per event",
    "raw_read_all_event": f"read_all, per event, pages of {READ_PAGE} (harness raw)",
    "pgstate_read_all_event": f"Store.read_all, per event, pages of {READ_PAGE}",
}


def child(variant: str, calls: int, dsn: str) -> None:
    """One measured run: set-up whose cost does not depend on ``calls``, then the calls."""
    store = Store(dsn)
    conn = psycopg.connect(libpq_dsn(dsn), autocommit=True)
    run = uuid.uuid4().hex[:8]
    data = {"from": "off", "to": "on", "w": 3}
    if variant.startswith("pgstate_transition"):
        instances = [f"toggle-{run}-{n}" for n in range(INSTANCES)]
        for instance in instances:
            store.create(instance, Toggle, conn=conn)
        lost = variant.endswith("_lost")
        for call in range(calls):
            # A lost call changes nothing: every instance stays "off", refused as stale.
            switch_on = lost or (call // INSTANCES) % 2 == 0
            source = "off" if switch_on else "on"
            try:
                store.transition(
                    instances[call % INSTANCES],
                    "switch_on" if switch_on else "switch_off",
                    expected_state="on" if lost else source,
                    data=data,
                    record_as="Transitioned",
                    conn=conn,
                )
            except StaleState:
                assert lost
    elif variant.startswith("raw_transition"):
        base = int(conn.execute("SELECT coalesce(max(id), 0) FROM tickets").fetchall()[0][0])
        conn.execute(
            "INSERT INTO tickets SELECT g, 'off' FROM generate_series(%s::bigint, %s) g",
            (base + 1, base + INSTANCES),
        )
        lost = variant.endswith("_lost")
        for call in range(calls):
            switch_on = lost or (call // INSTANCES) % 2 == 0
            source, target = ("off", "on") if switch_on else ("on", "off")
            params = {
                "to": target,
                "id": base + 1 + call % INSTANCES,
                "from": target if lost else source,
                "s": f"ticket-{run}",
                "type": "Transitioned",
                "data": Jsonb(data),
            }
            rows = conn.execute(RAW_TRANSITION_AND_RECORD, params).fetchall()
            assert bool(rows) != lost
    elif variant == "pgstate_append":
        for call in range(calls):
            events: list[dict[str, Any]] = [{"type": "Happened", "data": {"n": call}}]
            batch = [NewEvent(type=e["type"], data=e["data"]) for e in events]
            store.append(f"stream-{run}-{call % INSTANCES}", batch, conn=conn)
    elif variant == "raw_append":
        for call in range(calls):
            events = [{"type": "Happened", "data": {"n": call}}]
            params = {
                "s": f"stream-{run}-{call % INSTANCES}",
                "types": [e["type"] for e in events],
                "datas": [Jsonb(e["data"]) for e in events],
            }
            conn.execute(RAW_APPEND_ANY, params).fetchall()
    elif variant.endswith("_append_conflict"):
        # A contended append that lost, as each driver's harness client handles it: raw
        # catches the unique violation and asks for the stream's version; pgstate's peer
        # driver takes it from the VersionConflict.
        stream_id = f"contended-{run}"
        store.append(stream_id, [NewEvent(type="Happened", data={})], conn=conn)
        conn.execute(
            "INSERT INTO events (stream_id, version, type, data) VALUES (%s, 1, 'Happened', '{}')",
            (stream_id,),
        )
        for call in range(calls):
            events = [{"type": "Happened", "data": {"n": call}}]
            if variant == "pgstate_append_conflict":
                batch = [NewEvent(type=e["type"], data=e["data"]) for e in events]
                try:
                    store.append(stream_id, batch, expected_version=0, conn=conn)
                except VersionConflict as conflict:
                    assert conflict.current_version == 1
            else:
                params = {
                    "s": stream_id,
                    "base": 0,
                    "types": [e["type"] for e in events],
                    "datas": [Jsonb(e["data"]) for e in events],
                }
                try:
                    conn.execute(RAW_APPEND_EXPECTED, params).fetchall()
                except psycopg.errors.UniqueViolation:
                    row = conn.execute(RAW_CURRENT_VERSION, (stream_id,)).fetchone()
                    assert row is not None and row[0] == 1
    elif variant.endswith("_batch_event"):
        # The harness's fill: each batch goes to a fresh stream's end, as in read_back.
        for call in range(calls // BATCH):
            stream_id = f"fill-{run}-{call}"
            events = [
                {"type": "Filled", "data": {"s": stream_id, "i": i, "note": "x" * 64}}
                for i in range(BATCH)
            ]
            if variant == "pgstate_batch_event":
                batch = [NewEvent(type=e["type"], data=e["data"]) for e in events]
                store.append(stream_id, batch, conn=conn)
            else:
                params = {
                    "s": stream_id,
                    "types": [e["type"] for e in events],
                    "datas": [Jsonb(e["data"]) for e in events],
                }
                conn.execute(RAW_APPEND_ANY, params).fetchall()
    elif variant == "pgstate_read_all_event":
        page = None
        for _ in range(calls // READ_PAGE):
            page = store.read_all(after=page, limit=READ_PAGE, conn=conn).last_position
    elif variant == "raw_read_all_event":
        position = 0
        for _ in range(calls // READ_PAGE):
            rows = conn.execute(RAW_READ_ALL, (position, READ_PAGE)).fetchall()
            built = [tuple(row) for row in rows]  # the harness builds an Event per row
            position = built[-1][0]
    else:
        raise SystemExit(f"unknown variant {variant}")
    conn.close()
    store.close()


def counted(variant: str, calls: int, dsn: str) -> int:
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            variant,
            str(calls),
            dsn,
        ],
        capture_output=True,
        text=True,
        check=True,
        # A fixed hash seed: the same dict and set layouts, so the same count, on every run.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-2000:]}")
    return int(found.group(1))


def fill_for_reads(store: Store, dsn: str, events: int) -> None:
    """The same events in both logs, for the read variants."""
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        for start in range(0, events, 1000):
            batch = [
                NewEvent(type="Filled", data={"s": "fill", "i": start + i, "note": "x" * 64})
                for i in range(1000)
            ]
            store.append(f"fill-{start // 1000}", batch, conn=conn)
            conn.execute(
                "INSERT INTO events (stream_id, version, type, data)"
                " SELECT %s, g, 'Filled', jsonb_build_object('s', 'fill', 'i', g,"
                " 'note', repeat('x', 64)) FROM generate_series(1, 1000) g",
                (f"fill-{start // 1000}",),
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", default="100,600", help="N1,N2 calls per variant")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "CALLS", "DSN"))
    args = parser.parse_args(argv)
    if args.child:
        variant, calls, dsn = args.child
        child(variant, int(calls), dsn)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    low, high = (int(n) for n in args.calls.split(","))
    server = EmbeddedPostgres(settings={"fsync": "off", "synchronous_commit": "off"}).start()
    try:
        dsn = server.url()
        store = toggle_store(dsn)
        with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
            conn.execute(RAW_SCHEMA)
        variants = args.only.split(",")
        reads = [v for v in variants if v.endswith("_read_all_event")]
        if reads:
            fill_for_reads(store, dsn, high // PAGES_PER_CALLS * READ_PAGE)
        store.close()
        print(f"client instructions per call, (N={high} - N={low}) / {high - low}")
        print("| variant | instructions | what |\n|---|---|---|")
        results: dict[str, Any] = {}
        for variant in variants:
            # A read variant's calls are events, read in whole pages.
            scale = READ_PAGE // PAGES_PER_CALLS if variant in reads else 1
            if variant.endswith("_batch_event"):
                scale = BATCH // 10  # calls are events here, appended in whole batches
            first = counted(variant, low * scale, dsn)
            second = counted(variant, high * scale, dsn)
            results[variant] = (second - first) / ((high - low) * scale)
            print(f"| {variant} | {results[variant]:,.0f} | {VARIANTS[variant]} |", flush=True)
        for name in ("transition", "transition_lost", "append", "batch_event", "read_all_event"):
            raw, ours = results.get(f"raw_{name}"), results.get(f"pgstate_{name}")
            if raw and ours:
                print(f"pgstate_{name} / raw_{name}: {ours / raw:.2f}x")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
