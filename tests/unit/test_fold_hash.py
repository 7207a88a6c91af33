"""A fold's hash follows its code even where the source cannot be read (exec, a REPL), so a
changed fold never resumes from snapshots the old code wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from pgstate.fold import Fold

TEMPLATE = """
from pgstate.fold import Fold

class Balance(Fold):
    name = "balance"

    def initial(self):
        return {{"total": 0}}

    def apply(self, state, event):
        scale = lambda n: n * {factor}
        if event.type in {{"Opened", "Closed", "Moved", "Paid", "Shipped"}}:
            return state
        return {{"total": state["total"] + scale(event.data["n"])}}
"""


def fold_from_exec(factor: int) -> Fold:
    namespace: dict[str, Any] = {}
    exec(TEMPLATE.format(factor=factor), namespace)  # no file: inspect cannot find the source
    fold = namespace["Balance"]()
    assert isinstance(fold, Fold)
    return fold


def test_unreadable_source_still_changes_the_hash_with_the_code() -> None:
    once, again, changed = fold_from_exec(1), fold_from_exec(1), fold_from_exec(2)
    assert once.fold_hash() == again.fold_hash()
    # The change is inside a nested function: its code object is part of the hash too.
    assert once.fold_hash() != changed.fold_hash()


def test_unreadable_source_hash_is_the_same_in_another_process() -> None:
    script = (
        "import sys; sys.path[:0] = sys.argv[1:]\n"
        "from tests.unit.test_fold_hash import fold_from_exec\n"
        "print(fold_from_exec(1).fold_hash())"
    )
    # Other hash seeds lay out the set literal's frozenset constant in other orders.
    hashes = {
        subprocess.run(
            [sys.executable, "-c", script, *sys.path],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2, 3, 4)
    }
    assert hashes == {fold_from_exec(1).fold_hash()}


@pytest.mark.parametrize("value", [1e16, -2.5e20, float(2**60)])
def test_a_float_the_database_gives_back_as_an_int_is_not_snapshotted(value: float) -> None:
    from pgstate import InvalidInput
    from pgstate.fold import snapshot_text

    assert snapshot_text({"total": 9.99e15})  # below the line: stored as it is
    with pytest.raises(InvalidInput, match="comes back from the database as an int"):
        snapshot_text({"total": value})
