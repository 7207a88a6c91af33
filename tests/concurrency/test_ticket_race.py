"""8 agent processes (classifiers, drafters, escalators) drive 500 tickets through the
triage lifecycle at once, some stalling past their leases. Checked over the whole history:
no step applied twice, none skipped, lifecycle order, contiguous versions."""

from __future__ import annotations

import pytest

from pgstate.demo import run_scenario


@pytest.mark.committing
def test_eight_agents_500_tickets(fresh_db: str) -> None:
    result = run_scenario(
        fresh_db, tickets=500, agents=8, stall_rate=0.02, lease_ttl=0.3, deadline=240
    )
    assert result.violations == []
    assert result.resolved == 500
    # Each of the six steps was acknowledged exactly once per ticket.
    assert dict(result.applied) == {
        event: 500
        for event in (
            "start_classifying",
            "classify",
            "start_drafting",
            "draft",
            "start_escalating",
            "resolve",
        )
    }


@pytest.mark.committing
def test_a_second_run_after_one_cut_short_numbers_its_tickets_after_all_of_them(
    fresh_db: str,
) -> None:
    """A run stopped by its deadline leaves unresolved tickets; the next run must not
    reuse their ids (it failed with "already exists"), and an unfinished ticket is not a
    violation."""
    first = run_scenario(fresh_db, tickets=20, agents=1, deadline=0.0)
    assert first.violations == [] and first.resolved < 20
    second = run_scenario(fresh_db, tickets=30, agents=3, deadline=240)
    # Its agents finish the tickets the first run left, too.
    assert second.violations == [] and second.resolved == 30 + 20 - first.resolved
