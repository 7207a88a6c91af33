"""The peer benchmark's summary tables: ratios and target verdicts from a harness result
document (the JSON `../shared/bench/run.py --json` writes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_peers.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_peers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(workload: str, driver: str, rep: int = 0, **metrics: Any) -> dict[str, Any]:
    return {
        "pg_label": "pg18",
        "workload": workload,
        "driver": driver,
        "rep": rep,
        "metrics": metrics,
    }


def document(*cells: dict[str, Any]) -> dict[str, Any]:
    return {"results": list(cells)}


def rows(table: str) -> list[list[str]]:
    return [
        [field.strip() for field in line.strip("|").split("|")] for line in table.splitlines()[2:]
    ]


def test_ratios_pair_each_repetition_with_the_baseline_of_the_same_repetition() -> None:
    run_peers = load_script()
    # The machine ran at half speed in repetition 1: both sides slowed down alike.
    results = document(
        cell("ticket_race", "pgstate", 0, transitions_per_s=3000.0),
        cell("ticket_race", "pgstate", 1, transitions_per_s=1500.0),
        cell("ticket_race", "pgstate", 2, transitions_per_s=3300.0),
        cell("ticket_race", "raw", 0, transitions_per_s=6000.0),
        cell("ticket_race", "raw", 1, transitions_per_s=3000.0),
        cell("ticket_race", "raw", 2, transitions_per_s=5500.0),
    )
    [row] = rows(run_peers.ratio_table(results))
    assert row[:4] == ["pg18", "ticket_race", "pgstate", "3,000 transitions_per_s"]
    assert row[4] == "0.50x"  # median of 0.50, 0.50, 0.60 (median over medians: 0.55)
    assert row[5:] == ["-", "-", "-"]  # baselines that did not run


def test_targets_say_which_are_reached() -> None:
    run_peers = load_script()
    results = document(
        cell("ticket_race", "pgstate", transitions_per_s=5000.0),
        cell("ticket_race", "redis_lua_aof_always", transitions_per_s=4000.0),
        cell("ticket_race", "eventsourcing", transitions_per_s=2000.0),
        cell("append_distinct", "pgstate", events_per_s=800.0),
        cell("append_distinct", "raw", events_per_s=1000.0),
    )
    verdicts = {row[1]: (row[2], row[3]) for row in rows(run_peers.target_table(results))}
    assert verdicts == {
        "ticket_race transitions_per_s >= 1.0x redis_lua_aof_always": ("1.25x", "yes"),
        "ticket_race transitions_per_s >= 5.0x eventsourcing": ("2.50x", "no"),
        "append_distinct events_per_s >= 0.9x raw": ("0.80x", "no"),
    }


def test_the_catchup_target_counts_every_repetition_at_its_rate() -> None:
    run_peers = load_script()
    catchup = "catchup_lag"
    passing = document(
        cell(catchup, "pgstate", 0, rate_per_s=3000, missed=0, lag_p99_ms=1.2),
        cell(catchup, "pgstate", 1, rate_per_s=3000, missed=0, lag_p99_ms=1.9),
        cell(catchup, "pgstate", 2, rate_per_s=200, missed=5, lag_p99_ms=9.0),  # other rate
    )
    [row] = rows(run_peers.target_table(passing))
    assert row[2:] == ["0 missed, worst p99 1.90 ms", "yes"]

    one_slow = document(
        cell(catchup, "pgstate", 0, rate_per_s=3000, missed=0, lag_p99_ms=1.2),
        cell(catchup, "pgstate", 1, rate_per_s=3000, missed=0, lag_p99_ms=2.3),
    )
    assert rows(run_peers.target_table(one_slow))[0][3] == "no"

    one_missed = document(cell(catchup, "pgstate", rate_per_s=3000, missed=1, lag_p99_ms=0.5))
    assert rows(run_peers.target_table(one_missed))[0][2:] == [
        "1 missed, worst p99 0.50 ms",
        "no",
    ]


def test_a_broken_cell_fails_its_target() -> None:
    run_peers = load_script()
    catchup = cell("catchup_lag", "pgstate", 0, rate_per_s=3000, missed=0, lag_p99_ms=0.5)
    catchup["violation_total"] = 3  # e.g. events delivered twice
    race = cell("ticket_race", "pgstate", 0, transitions_per_s=9000.0)
    race["ok"] = False
    results = document(
        catchup, race, cell("ticket_race", "redis_lua_aof_always", 0, transitions_per_s=10.0)
    )
    verdicts = {row[1]: (row[2], row[3]) for row in rows(run_peers.target_table(results))}
    assert verdicts["ticket_race transitions_per_s >= 1.0x redis_lua_aof_always"] == (
        "900.00x, 1 broken cell(s)",
        "no",
    )
    assert verdicts["catchup_lag at 3000/s: 0 missed, p99 <= 2.0 ms"] == (
        "0 missed, worst p99 0.50 ms, 1 broken cell(s)",
        "no",
    )
