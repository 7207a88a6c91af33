"""Why the harness's batch fill runs below raw when the instruction counts are close:
CPU per event alone, then eight writers at once, and the write-ahead log each one writes.

Starts a durable embedded PostgreSQL, sets up the harness's raw driver and pgstate's peer
driver in two databases, and appends the harness's fill events (batches of 100 with its
64-character filler, each batch a new stream at expected version 0):

* sequentially, one connection per driver, a round each in turn: events/s, the client's and
  the backend's CPU per event (``/proc/<pid>/schedstat``) and WAL bytes per event;
* with eight processes at once (the harness's shape), sampling ``pg_stat_activity`` every
  millisecond for what the backends wait on;
* once more, after a checkpoint, through ``pg_waldump --stats=record``: the WAL records
  each driver writes for the same 20 batches.

    /work/benchvenv/bin/python benchmarks/fill_wal.py [--rounds 3] [--writers 8]

Environment: BENCH_DIR (default ../shared/bench), for the harness's raw driver.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psycopg

from pgstate._embedded import EmbeddedPostgres

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_DIR", str(PROJECT.parent / "shared" / "bench")))

from drivers.raw import Raw  # type: ignore[import-not-found]  # noqa: E402
from peer_driver import PgState  # noqa: E402

BATCH = 100
PAD = "x" * 64  # the harness's filler
DRIVERS: dict[str, type[Any]] = {"raw": Raw, "pgstate": PgState}
WAITS = """
SELECT wait_event_type, wait_event FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND state = 'active'
"""
LSN = "SELECT pg_current_wal_insert_lsn()::text"
WAL_SINCE = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)"


def batch(stream_id: str) -> list[dict[str, Any]]:
    return [{"type": "Filled", "data": {"s": stream_id, "i": i, "note": PAD}} for i in range(BATCH)]


def backend_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as stats:
        return int(stats.read().split()[0]) / 1e9


def wal_bytes_since(conn: psycopg.Connection[Any], lsn: str) -> float:
    row = conn.execute(WAL_SINCE, (lsn,)).fetchone()
    assert row is not None
    return float(row[0])


def current_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(LSN).fetchone()
    assert row is not None
    return str(row[0])


def sequential_round(name: str, dsn: str, tag: str, batches: int) -> str:
    driver = DRIVERS[name]()
    driver.connect(dsn)
    try:
        pid = driver.conn.info.backend_pid
        with psycopg.connect(dsn, autocommit=True) as monitor:
            lsn = current_lsn(monitor)
            started, client = time.perf_counter(), time.process_time()
            backend = backend_cpu_seconds(pid)
            for number in range(batches):
                driver.append(f"r-{tag}-{number}", batch(f"r-{tag}-{number}"), 0)
            wall = time.perf_counter() - started
            client = time.process_time() - client
            backend = backend_cpu_seconds(pid) - backend
            wal = wal_bytes_since(monitor, lsn)
    finally:
        driver.close()
    events = batches * BATCH
    return (
        f"| {name} | {events / wall:,.0f} | {client / events * 1e6:.1f} "
        f"| {backend / events * 1e6:.1f} | {wal / events:,.0f} |"
    )


def writer(
    name: str, dsn: str, tag: str, batches: int, barrier: Barrier, spans: Queue[tuple[float, float]]
) -> None:
    driver = DRIVERS[name]()
    driver.connect(dsn)
    try:
        barrier.wait()
        started = time.perf_counter()
        for number in range(batches):
            driver.append(f"c-{tag}-{number}", batch(f"c-{tag}-{number}"), 0)
        spans.put((started, time.perf_counter()))
    finally:
        driver.close()


def concurrent_round(name: str, dsn: str, tag: str, writers: int, batches: int) -> str:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(writers + 1)
    spans: Queue[tuple[float, float]] = context.Queue()
    processes = [
        context.Process(target=writer, args=(name, dsn, f"{tag}-{n}", batches, barrier, spans))
        for n in range(writers)
    ]
    for process in processes:
        process.start()
    waits: Counter[str] = Counter()
    with psycopg.connect(dsn, autocommit=True) as monitor:
        barrier.wait()
        finished: list[tuple[float, float]] = []
        while len(finished) < writers:
            for kind, event in monitor.execute(WAITS).fetchall():
                waits[f"{kind}/{event}" if kind else "running"] += 1
            time.sleep(0.001)
            while not spans.empty():
                finished.append(spans.get())
            if not any(process.is_alive() for process in processes) and spans.empty():
                break
        # perf_counter is the same clock in every process of one machine.
        wall = max(end for _, end in finished) - min(start for start, _ in finished)
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a {name} writer failed")
    total = sum(waits.values()) or 1
    shares = ", ".join(f"{key} {100 * count / total:.0f} %" for key, count in waits.most_common(6))
    return f"| {name} | {writers * batches * BATCH / wall:,.0f} | {shares} |"


def wal_records(server: EmbeddedPostgres, name: str, dsn: str, batches: int) -> str:
    """The WAL records of ``batches`` batches written after a checkpoint and a warm-up
    (so that no page's first change after the checkpoint adds a full-page image)."""
    driver = DRIVERS[name]()
    driver.connect(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as monitor:
            monitor.execute("CHECKPOINT")
            for number in range(5):
                driver.append(f"w-warm-{number}", batch(f"w-warm-{number}"), 0)
            start = current_lsn(monitor)
            for number in range(batches):
                driver.append(f"w-{number}", batch(f"w-{number}"), 0)
            end = current_lsn(monitor)
    finally:
        driver.close()
    dump = subprocess.run(
        [
            str(server.bin / "pg_waldump"),
            "-p",
            str(server.data / "pg_wal"),
            "-s",
            start,
            "-e",
            end,
            "--stats=record",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: dict[str, tuple[int, int]] = {}
    for line in dump.splitlines():
        # "Heap/INSERT   1956 ( 32.10)   392133 ( 56.63) ..." and "Total   6094   692452 [...]"
        match = re.match(r"(\S+/\S+)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)", line.strip())
        match = match or re.match(r"(Total)\s+(\d+)\s+(\d+)", line.strip())
        if match:
            counts[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    events = batches * BATCH

    def per_event(kind: str) -> str:
        records, size = counts.get(kind, (0, 0))
        return f"{records / events:.2f} / {size / events:,.0f}"

    splits = sum(records for kind, (records, _) in counts.items() if "SPLIT" in kind)
    return (
        f"| {name} | {counts['Total'][1] / events:,.0f} | {per_event('Heap/INSERT')} "
        f"| {per_event('Btree/INSERT_LEAF')} | {splits} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--batches", type=int, default=25, help="per writer, concurrently")
    args = parser.parse_args(argv)
    server = EmbeddedPostgres().start()
    try:
        dsns = {name: server.url(f"{name}_fill") for name in DRIVERS}
        with psycopg.connect(server.url(), autocommit=True) as conn:
            for name in DRIVERS:
                conn.execute(f"CREATE DATABASE {name}_fill")
        for name, dsn in dsns.items():
            DRIVERS[name]().setup(dsn)

        print("Sequential, one connection, 60 batches of 100 per round\n")
        print("| driver | events/s | client CPU µs/event | backend CPU µs/event | WAL B/event |")
        print("|---|---|---|---|---|")
        for number in range(args.rounds):
            for name, dsn in dsns.items():
                print(sequential_round(name, dsn, f"s{number}", 60))

        print(f"\n{args.writers} writers at once, {args.batches} batches each\n")
        print("| driver | events/s | what the active backends were doing (samples) |")
        print("|---|---|---|")
        for number in range(args.rounds):
            for name, dsn in dsns.items():
                print(concurrent_round(name, dsn, f"c{number}", args.writers, args.batches))

        print("\nWAL records of 20 batches after a checkpoint (per event: records / bytes)\n")
        print("| driver | WAL B/event | heap inserts | B-tree leaf inserts | page splits |")
        print("|---|---|---|---|---|")
        for name, dsn in dsns.items():
            print(wal_records(server, name, dsn, 20))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
