"""Run the shared peer harness with pgstate beside its peers and print the ratio table.

    python benchmarks/run_peers.py                       # small scale, PostgreSQL 18
    python benchmarks/run_peers.py --scale full --pg embedded,system --repeat 3
    python benchmarks/run_peers.py --workloads catchup_lag --set catchup_n=6000 \
        --set catchup_rate=3000

Environment: BENCH_DIR (default ../shared/bench), BENCH_PYTHON (default
$BENCH_DIR/.venv/bin/python if it exists, else this Python; its venv needs the harness
requirements and this project installed: pip install -r $BENCH_DIR/requirements.txt &&
pip install -e .). Where the harness directory is read-only, make the venv elsewhere:

    python3 -m venv /work/benchvenv && /work/benchvenv/bin/pip install \
        -r ../shared/bench/requirements.txt && /work/benchvenv/bin/pip install -e .
    BENCH_PYTHON=/work/benchvenv/bin/python python benchmarks/run_peers.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
DRIVERS = (
    "raw,raw_notify,pgstate,pgstate_commit_notify,eventsourcing,redis_lua,redis_lua_aof_always"
)
WORKLOADS = "append_distinct,append_contended,ticket_race,read_back,catchup_lag"
# The figure each workload is compared on, as the harness's JSON names it.
HEADLINE = {
    "append_distinct": "events_per_s",
    "append_contended": "committed_per_s",
    "ticket_race": "transitions_per_s",
    "read_back": "read_all_events_per_s",
}
BASELINES = ("raw", "raw_notify", "eventsourcing", "redis_lua_aof_always")
# The performance targets pgstate is held to (the default driver, medians over repetitions):
# (workload, figure, baseline, least ratio).
RATIO_TARGETS = (
    ("ticket_race", "transitions_per_s", "redis_lua_aof_always", 1.0),
    ("ticket_race", "transitions_per_s", "eventsourcing", 5.0),
    ("append_distinct", "events_per_s", "raw", 0.9),
    ("append_contended", "committed_per_s", "raw", 0.9),
    ("read_back", "read_all_events_per_s", "raw", 1.0),
    ("read_back", "populate_batch100_events_per_s", "raw", 1.0),
)
# The catch-up target holds at this append rate: nothing missed and a p99 lag within bound.
CATCHUP_RATE = 3000
CATCHUP_P99_MS = 2.0


Figures = dict[tuple[str, str, str, str], dict[int, float]]


def collect(results: dict[str, Any]) -> Figures:
    """Every numeric figure of the run: (PostgreSQL, workload, driver, figure) -> {repetition:
    value}."""
    figures: Figures = defaultdict(dict)
    for cell in results.get("results", []):
        repetition = int(cell.get("rep", 0))  # as the harness's own report reads it
        key = (cell.get("pg_label", ""), cell.get("workload", ""), cell.get("driver", ""))
        for name, value in cell.get("metrics", {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                figures[(*key, name)][repetition] = float(value)
    return figures


def paired_ratio(ours: dict[int, float], theirs: dict[int, float]) -> float | None:
    """The median over repetitions of ours / theirs within each repetition, as the harness
    computes its own "vs raw": a drift of the machine's speed between repetitions then
    moves both sides of a ratio alike."""
    ratios = [ours[r] / theirs[r] for r in sorted(ours.keys() & theirs.keys()) if theirs[r]]
    return statistics.median(ratios) if ratios else None


def ratio_table(results: dict[str, Any]) -> str:
    """pgstate's headline figures (medians over repetitions) against each baseline (paired
    ratios, see :func:`paired_ratio`), per PostgreSQL flavour and workload."""
    figures = collect(results)
    lines = [
        "| PostgreSQL | workload | driver | figure | "
        + " | ".join(f"vs {b}" for b in BASELINES)
        + " |",
        "|---|---|---|---|" + "---|" * len(BASELINES),
    ]
    for (label, workload, driver, name), ours in sorted(figures.items()):
        if not driver.startswith("pgstate") or HEADLINE.get(workload) != name:
            continue
        row = [label, workload, driver, f"{statistics.median(ours.values()):,.0f} {name}"]
        for baseline in BASELINES:
            ratio = paired_ratio(ours, figures.get((label, workload, baseline, name), {}))
            row.append("-" if ratio is None else f"{ratio:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def broken_cells(results: dict[str, Any], label: str, workload: str, driver: str) -> int:
    """How many of the run's cells for this driver and workload failed or broke an
    invariant: a target they belong to is not reached, whatever their figures."""
    return sum(
        1
        for cell in results.get("results", [])
        if (cell.get("pg_label", ""), cell.get("workload"), cell.get("driver"))
        == (label, workload, driver)
        and (cell.get("ok") is False or bool(cell.get("violation_total")))
    )


def target_table(results: dict[str, Any], driver: str = "pgstate") -> str:
    """Each performance target against this run: the ratio (paired, as in the ratio table)
    or lag measured, and whether it is reached. A target whose workload or baseline did not
    run is left out."""
    figures = collect(results)
    lines = ["| PostgreSQL | target | measured | reached |", "|---|---|---|---|"]
    for label in sorted({key[0] for key in figures}):
        for workload, figure, baseline, least in RATIO_TARGETS:
            ours = figures.get((label, workload, driver, figure), {})
            ratio = paired_ratio(ours, figures.get((label, workload, baseline, figure), {}))
            if ratio is None:
                continue
            target = f"{workload} {figure} >= {least}x {baseline}"
            broken = broken_cells(results, label, workload, driver)
            verdict = "yes" if ratio >= least and not broken else "no"
            measured = f"{ratio:.2f}x" + (f", {broken} broken cell(s)" if broken else "")
            lines.append(f"| {label} | {target} | {measured} | {verdict} |")
        rates = figures.get((label, "catchup_lag", driver, "rate_per_s"), {})
        at_rate = [r for r, rate in rates.items() if rate == CATCHUP_RATE]
        if at_rate:
            missed_by_rep = figures.get((label, "catchup_lag", driver, "missed"), {})
            p99_by_rep = figures.get((label, "catchup_lag", driver, "lag_p99_ms"), {})
            missed = int(sum(missed_by_rep.get(r, 0.0) for r in at_rate))
            worst_p99 = max(p99_by_rep.get(r, float("inf")) for r in at_rate)
            target = f"catchup_lag at {CATCHUP_RATE}/s: 0 missed, p99 <= {CATCHUP_P99_MS} ms"
            broken = broken_cells(results, label, "catchup_lag", driver)
            reached = missed == 0 and worst_p99 <= CATCHUP_P99_MS and not broken
            verdict = "yes" if reached else "no"
            measured = f"{missed} missed, worst p99 {worst_p99:.2f} ms"
            if broken:
                measured += f", {broken} broken cell(s)"
            lines.append(f"| {label} | {target} | {measured} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drivers", default=DRIVERS)
    parser.add_argument("--workloads", default=WORKLOADS)
    parser.add_argument("--scale", default="small")
    parser.add_argument("--pg", default="embedded")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", default=str(PROJECT / "benchmarks" / "results" / "peers.json"))
    args = parser.parse_args(argv)
    bench_dir = Path(os.environ.get("BENCH_DIR", PROJECT.parent / "shared" / "bench"))
    bench_venv_python = bench_dir / ".venv" / "bin" / "python"
    default_python = str(bench_venv_python) if bench_venv_python.exists() else sys.executable
    python = os.environ.get("BENCH_PYTHON", default_python)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    command = [
        python,
        str(bench_dir / "run.py"),
        "--driver-file",
        str(PROJECT / "benchmarks" / "peer_driver.py"),
        "--drivers",
        args.drivers,
        "--workloads",
        args.workloads,
        "--scale",
        args.scale,
        "--pg",
        args.pg,
        "--repeat",
        str(args.repeat),
        "--json",
        args.json,
    ]
    for override in args.overrides:
        command += ["--set", override]
    print(" ".join(command), flush=True)
    status = subprocess.call(command, cwd=PROJECT)
    try:
        with open(args.json, encoding="utf-8") as results:
            document = json.load(results)
        print("\n" + ratio_table(document))
        print("\n" + target_table(document))
    except (OSError, ValueError) as exc:
        print(f"no ratio table: {exc}")
    return status


if __name__ == "__main__":
    sys.exit(main())
