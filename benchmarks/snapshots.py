"""Rebuilding one stream's state from 50,000 events, with and without a snapshot.

python benchmarks/snapshots.py [--events 50000] [--dsn URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from pgstate import NewEvent, Store
from pgstate.fold import Fold
from pgstate.models import RecordedEvent


class Balance(Fold):
    name = "balance"
    snapshot_every = 1000

    def initial(self) -> dict[str, Any]:
        return {"balance": 0, "entries": 0}

    def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        return {"balance": state["balance"] + event.data["amount"], "entries": state["entries"] + 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--dsn")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    server = None
    dsn = args.dsn
    if dsn is None:
        from pgstate._embedded import EmbeddedPostgres

        server = EmbeddedPostgres().start()
        dsn = server.url()
    try:
        store = Store(dsn)
        store.migrate()
        for start in range(0, args.events, 5000):
            batch = [NewEvent(type="Posted", data={"amount": 1}) for _ in range(5000)]
            store.append("account-1", batch[: args.events - start])
        fold = Balance()
        timings: dict[str, list[float]] = {"without snapshot": [], "with snapshot": []}
        for _ in range(args.repeat):
            started = time.perf_counter()
            plain = store.load_state("account-1", fold, use_snapshot=False)
            timings["without snapshot"].append(time.perf_counter() - started)
            assert plain.state["entries"] == args.events
        store.load_state("account-1", fold)  # writes the snapshot
        store.append("account-1", [NewEvent(type="Posted", data={"amount": 1}) for _ in range(10)])
        for _ in range(args.repeat):
            started = time.perf_counter()
            snapped = store.load_state("account-1", fold)
            timings["with snapshot"].append(time.perf_counter() - started)
            assert snapped.state["entries"] == args.events + 10
            assert snapped.events_folded == 10
        store.close()
    finally:
        if server is not None:
            server.stop()
    without = statistics.median(timings["without snapshot"])
    with_snapshot = statistics.median(timings["with snapshot"])
    print("| load_state of one stream | events folded | median ms |")
    print("|---|---|---|")
    print(f"| without snapshot | {args.events:,} | {without * 1000:.1f} |")
    print(f"| with snapshot (+10 newer events) | 10 | {with_snapshot * 1000:.2f} |")
    print(f"\nspeed-up: {without / with_snapshot:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
