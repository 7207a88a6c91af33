"""Where a harness-style read_all spends its time: the database and the client, or
CPython's cyclic garbage collector.

Fills the same 20,000 events (200 streams of 100, as the harness's read_back) through the
harness's raw driver and through pgstate's peer driver, then reads everything back in pages
of 1,000 the way the harness does (each read's events kept in one list, the previous
read's list still alive while the next runs), the two drivers interleaved, and reports for
each read its wall time and the time and count of the collector's runs per generation.
A full (generation 2) collection walks every tracked object of the process, imports
included, so its cost depends on the process, not on the read; how often one falls inside
a read depends on how many container objects the read allocates.

    /work/benchvenv/bin/python benchmarks/read_gc.py [--reads 7] [--no-gc | --freeze]

Environment: BENCH_DIR (default ../shared/bench), for the harness's raw driver.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from pgstate._embedded import EmbeddedPostgres

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_DIR", str(PROJECT.parent / "shared" / "bench")))

from drivers.raw import Raw  # type: ignore[import-not-found]  # noqa: E402
from peer_driver import PgState  # noqa: E402

STREAMS, STREAM_LENGTH, PAGE = 200, 100, 1000
PAD = "x" * 64  # the harness's filler


class CollectorClock:
    """Time and count of the collector's runs per generation, via gc.callbacks."""

    def __init__(self) -> None:
        self.started = 0.0
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        gc.callbacks.append(self.observe)

    def observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        generation = info["generation"]
        self.runs[generation] += 1
        self.seconds[generation] += time.perf_counter() - self.started

    def reset(self) -> None:
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]


def read_everything(driver: Any) -> list[Any]:
    """The harness's full read: pages after the last position until an empty one."""
    events: list[Any] = []
    last = 0
    while True:
        page = driver.read_all(last, PAGE)
        if not page:
            return events
        events.extend(page)
        last = page[-1].position


def filled(driver: Any, dsn: str) -> Any:
    driver.connect(dsn)
    for number in range(STREAMS):
        stream_id = f"r-{number}"
        batch = [
            {"type": "Filled", "data": {"s": stream_id, "i": i, "note": PAD}}
            for i in range(STREAM_LENGTH)
        ]
        driver.append(stream_id, batch, 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reads", type=int, default=7, help="full reads per driver")
    parser.add_argument("--no-gc", action="store_true", help="turn the collector off")
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="gc.freeze() before the reads: what exists by then is never walked again",
    )
    args = parser.parse_args(argv)
    server = EmbeddedPostgres(durable=False).start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE raw_reads")
            conn.execute("CREATE DATABASE pgstate_reads")
        raw = Raw()
        with psycopg.connect(server.url("raw_reads"), autocommit=True) as conn:
            conn.execute(raw.schema_sql())
        ours = PgState()
        ours.setup(server.url("pgstate_reads"))
        drivers = {
            "raw": filled(raw, server.url("raw_reads")),
            "pgstate": filled(ours, server.url("pgstate_reads")),
        }
        print(f"tracked objects before the reads: {len(gc.get_objects()):,}")
        if args.no_gc:
            gc.disable()
        if args.freeze:
            gc.freeze()
        clock = CollectorClock()
        kept: dict[str, list[Any]] = {}
        walls: dict[str, list[float]] = {name: [] for name in drivers}
        print("| driver | read | wall ms | collector ms | runs gen 0/1/2 | ms gen 0/1/2 |")
        print("|---|---|---|---|---|---|")
        for number in range(args.reads):
            for name, driver in drivers.items():
                clock.reset()
                started = time.perf_counter()
                events = read_everything(driver)
                wall = time.perf_counter() - started
                assert len(events) == STREAMS * STREAM_LENGTH
                kept[name] = events  # the previous read's list lived until now, as in the harness
                walls[name].append(wall)
                runs = "/".join(str(n) for n in clock.runs)
                times = "/".join(f"{s * 1000:.1f}" for s in clock.seconds)
                print(
                    f"| {name} | {number + 1} | {wall * 1000:.0f} "
                    f"| {sum(clock.seconds) * 1000:.0f} | {runs} | {times} |"
                )
        medians = {name: statistics.median(values) for name, values in walls.items()}
        for name, median in medians.items():
            print(f"{name}: {STREAMS * STREAM_LENGTH / median:,.0f} events/s (median)")
        print(f"pgstate vs raw: {medians['raw'] / medians['pgstate']:.2f}x")
        for driver in drivers.values():
            driver.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
