"""Flat cost from an empty store to millions of events.

Fills the store with batch appends and, at each checkpoint (by default 0, 1M and 10M
events), measures append and transition latency (p50/p99 over sequential calls) and
read_stream / read_all speed. The figures that matter are the ratios to the empty store,
taken in the same run: to the first checkpoint's, and to a control database on the same
server that holds only the probes' few thousand events, measured right after each
checkpoint, so that a machine whose speed drifts during the fill (a shared VM) moves both
sides of that ratio alike.

    python benchmarks/scale.py                      # embedded PostgreSQL 18, 0 / 1M / 10M
    python benchmarks/scale.py --checkpoints 0,200000 --json benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from pgstate import NewEvent, Store
from pgstate._connect import libpq_dsn, psycopg_url
from pgstate.machine import Machine, State
from pgstate.models import Position

FILL_BATCH = 1000
FILL_STREAMS = 10_000


class Toggle(Machine):
    name = "ScaleToggle"
    off = State(initial=True)
    on = State()
    done = State(final=True)

    switch_on = off.to(on)
    switch_off = on.to(off)
    finish = on.to(done)


def toggle_store(dsn: str) -> Store:
    """A store on a migrated database with the Toggle machine registered: the set-up the
    scale, profile and client-instruction benchmarks share."""
    store = Store(dsn)
    store.migrate()
    store.register(Toggle)
    return store


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(calls: int, call: Callable[[int], object]) -> dict[str, float]:
    samples = []
    for index in range(calls):
        started = time.perf_counter_ns()
        call(index)
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)}


def fill_worker(dsn: str, worker: int, workers: int, batches: int) -> None:
    store = Store(dsn)
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        for batch in range(worker, batches, workers):
            stream = f"fill-{batch % FILL_STREAMS}"
            events = [NewEvent(type="Filled", data={"b": batch, "i": i}) for i in range(FILL_BATCH)]
            store.append(stream, events, conn=conn)
    store.close()


def fill(dsn: str, events: int, workers: int) -> float:
    """Append ``events`` events in batches from ``workers`` processes; returns events/s."""
    batches = events // FILL_BATCH
    if batches == 0:
        return 0.0
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    processes = [
        context.Process(target=fill_worker, args=(dsn, w, workers, batches)) for w in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError("a fill worker failed")
    return batches * FILL_BATCH / (time.perf_counter() - started)


def measure(store: Store, conn: psycopg.Connection[Any], label: str, calls: int) -> dict[str, Any]:
    conn.execute("VACUUM ANALYZE pgstate.events")
    conn.execute("VACUUM ANALYZE pgstate.streams")
    # Flush what the fill left dirty, so the timed calls do not share the disk with it.
    conn.execute("CHECKPOINT")
    # Appends: one event each, exact expected version, to 100 streams.
    versions: dict[str, int] = {}

    def append(index: int) -> None:
        stream = f"probe-{label}-{index % 100}"
        result = store.append(
            stream,
            [NewEvent(type="Probed", data={"i": index})],
            expected_version=versions.get(stream, 0),
            conn=conn,
        )
        versions[stream] = result.version

    appends = timed(calls, append)
    # Transitions through transition_v3, alternating on/off on 100 instances.
    instances = [f"toggle-{label}-{n}" for n in range(100)]
    for stream in instances:
        store.create(stream, Toggle, conn=conn)

    def transition(index: int) -> None:
        stream = instances[index % 100]
        round_number = index // 100
        event = "switch_on" if round_number % 2 == 0 else "switch_off"
        store.transition(stream, event, expected_version=round_number + 1, conn=conn)

    transitions = timed(calls, transition)
    # read_stream of a 1000-event stream; read_all of 20,000 events from the middle.
    big = f"fill-{label}-big"
    store.append(big, [NewEvent(type="Filled", data={"i": i}) for i in range(1000)], conn=conn)
    started = time.perf_counter()
    for _ in range(20):
        assert len(store.read_stream(big, conn=conn)) == 1000
    read_stream_ms = (time.perf_counter() - started) / 20 * 1000
    total = store.read_all(limit=1, conn=conn)
    start_at: Position | None = None
    middle = conn.execute(
        "SELECT tx, pos FROM pgstate.events ORDER BY tx DESC, pos DESC OFFSET 30000 LIMIT 1"
    ).fetchone()
    if middle is not None:
        start_at = Position(int(middle[0]), middle[1])
    elif total.events:
        start_at = None
    read = 0
    started = time.perf_counter()
    after = start_at
    while read < 20_000:
        page = store.read_all(after=after, limit=1000, conn=conn)
        if not page.events:
            break
        read += len(page.events)
        after = page.last_position
    read_all_eps = read / (time.perf_counter() - started)
    return {
        "append": appends,
        "transition": transitions,
        "read_stream_1000_ms": round(read_stream_ms, 2),
        "read_all_events_per_s": round(read_all_eps),
        "read_all_events": read,
    }


CONTROL_DATABASE = "pgstate_scale_control"


def make_control_database(dsn: str) -> str:
    """A fresh database beside the measured one, for the control store; its URL."""
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(CONTROL_DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(CONTROL_DATABASE)))
    return psycopg_url(dsn).set(database=CONTROL_DATABASE).render_as_string(hide_password=False)


def drop_control_database(dsn: str) -> None:
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(CONTROL_DATABASE)))


def ratio(figures: dict[str, Any], baseline: dict[str, Any], operation: str) -> str:
    return f"{figures[operation]['p50_ms'] / baseline[operation]['p50_ms']:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", help="database URL (default: a fresh embedded PostgreSQL 18)")
    parser.add_argument("--checkpoints", default="0,1000000,10000000")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--fill-workers", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    server = None
    dsn = args.dsn
    if dsn is None:
        from pgstate._embedded import EmbeddedPostgres

        server = EmbeddedPostgres(settings={"max_wal_size": "4GB"}).start()
        dsn = server.url()
    try:
        store = toggle_store(dsn)
        control_url = make_control_database(dsn)
        control = toggle_store(control_url)
        results: list[dict[str, Any]] = []
        filled = 0
        with (
            psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn,
            psycopg.connect(libpq_dsn(control_url), autocommit=True) as control_conn,
        ):
            for checkpoint in checkpoints:
                rate = (
                    fill(dsn, checkpoint - filled, args.fill_workers) if checkpoint > filled else 0
                )
                filled = max(filled, checkpoint)
                row = conn.execute("SELECT count(*) FROM pgstate.events").fetchone()
                count = int(row[0]) if row else 0
                figures = measure(store, conn, str(checkpoint), args.calls)
                figures["control"] = measure(control, control_conn, str(checkpoint), args.calls)
                figures.update({"events_in_store": count, "fill_events_per_s": round(rate)})
                results.append(figures)
                print(json.dumps(figures), flush=True)
        store.close()
        control.close()
        drop_control_database(dsn)
    finally:
        if server is not None:
            server.stop()
    base = results[0]
    print(
        "\n| events in store | append p50 / p99 ms | transition p50 / p99 ms | "
        "read_stream 1000 ms | read_all ev/s | append p50 vs empty: first / control "
        "| transition p50 vs empty: first / control |"
    )
    print("|---|---|---|---|---|---|---|")
    for figures in results:
        control = figures["control"]
        print(
            f"| {figures['events_in_store']:,} "
            f"| {figures['append']['p50_ms']:.3f} / {figures['append']['p99_ms']:.3f} "
            f"| {figures['transition']['p50_ms']:.3f} / {figures['transition']['p99_ms']:.3f} "
            f"| {figures['read_stream_1000_ms']} | {figures['read_all_events_per_s']:,} "
            f"| {ratio(figures, base, 'append')} / {ratio(figures, control, 'append')} "
            f"| {ratio(figures, base, 'transition')} / {ratio(figures, control, 'transition')} |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"command": " ".join(sys.argv), "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
