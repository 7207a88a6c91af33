"""The ticket-triage machine used by ``pgstate demo``, the tests and the benchmarks:
NEW -> CLASSIFYING -> CLASSIFIED -> DRAFTING -> DRAFT_READY -> ESCALATING -> RESOLVED."""

from __future__ import annotations

from datetime import timedelta

from pgstate.machine import Machine, State

# Each agent role moves a ticket from its entry state through a working state to its exit.
ROLES: dict[str, tuple[str, str, str, str]] = {
    # role: (entry state, start event, finish event, exit state)
    "classifier": ("new", "start_classifying", "classify", "classified"),
    "drafter": ("classified", "start_drafting", "draft", "draft_ready"),
    "escalator": ("draft_ready", "start_escalating", "resolve", "resolved"),
}

LIFECYCLE = [
    "$created",
    "start_classifying",
    "classify",
    "start_drafting",
    "draft",
    "start_escalating",
    "resolve",
]


class Ticket(Machine):
    new = State(initial=True)
    classifying = State(timeout=timedelta(minutes=5), on_timeout="give_up_classifying")
    classified = State()
    drafting = State(timeout=timedelta(minutes=5), on_timeout="give_up_drafting")
    draft_ready = State()
    escalating = State()
    resolved = State(final=True)

    start_classifying = new.to(classifying, requires_lease=True)
    classify = classifying.to(classified, requires_lease=True)
    give_up_classifying = classifying.to(new)
    start_drafting = classified.to(drafting, requires_lease=True)
    draft = drafting.to(draft_ready, requires_lease=True)
    give_up_drafting = drafting.to(classified)
    start_escalating = draft_ready.to(escalating, requires_lease=True)
    resolve = escalating.to(resolved, requires_lease=True)
