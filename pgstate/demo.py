"""``pgstate demo``: agent processes triage tickets concurrently through the Ticket
machine; some stall past their lease, as crashed or slow agents do. The database fences
every late or stale write; the run ends with an invariant check over the whole history."""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TextIO

import psycopg

from pgstate._connect import libpq_dsn
from pgstate._sql import query
from pgstate.errors import Rejected
from pgstate.store import Store
from pgstate.triage import LIFECYCLE, ROLES, Ticket


@dataclass
class AgentReport:
    name: str
    applied: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)


def ticket_id(number: int) -> str:
    return f"ticket-{number:07d}"


def run_agent(
    dsn: str,
    role: str,
    name: str,
    stop: Any,
    results: Any,
    lease_ttl: float = 0.5,
    stall_rate: float = 0.0,
    seed: int | None = None,
) -> None:
    """One agent: loop over tickets in its role's states until ``stop`` is set. With
    ``stall_rate`` > 0 it sometimes stalls past its lease, then tries to write anyway."""
    rng = random.Random(seed)
    entry, start_event, _finish_event, _ = ROLES[role]
    report = AgentReport(name)
    ttl = timedelta(seconds=lease_ttl)
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        store = Store(dsn)
        working = _working_state(start_event)
        while not stop.is_set():
            candidates = store.find_in_state(Ticket, entry, limit=50, conn=conn)
            candidates += store.find_in_state(Ticket, working, limit=10, conn=conn)
            if not candidates:
                time.sleep(0.02)
                continue
            rng.shuffle(candidates)
            applied_before = sum(report.applied.values())
            for stream_id in candidates:
                if stop.is_set():
                    break
                try:
                    _work_on(store, conn, stream_id, role, name, ttl, stall_rate, rng, report)
                except Rejected as rejection:
                    report.rejected[type(rejection).__name__] += 1
            if sum(report.applied.values()) == applied_before:
                time.sleep(0.01)  # every candidate was taken by others: back off a moment
        store.close()
    results.put(report)


def _working_state(start_event: str) -> str:
    edge = next(e for e in Ticket.definition()["edges"] if e["event"] == start_event)
    return str(edge["to"])


def _work_on(
    store: Store,
    conn: psycopg.Connection[Any],
    stream_id: str,
    role: str,
    name: str,
    ttl: timedelta,
    stall_rate: float,
    rng: random.Random,
    report: AgentReport,
) -> None:
    entry, start_event, finish_event, _ = ROLES[role]
    actor = {"kind": role, "name": name}
    lease = store.acquire_lease(stream_id, name, ttl, conn=conn)
    version = lease.version
    if lease.state == entry:
        started = store.transition(
            stream_id,
            start_event,
            expected_state=entry,
            expected_version=version,
            lease_epoch=lease.epoch,
            idempotency_key=f"{name}:{start_event}:{version}",
            actor=actor,
            conn=conn,
        )
        report.applied[start_event] += 1
        version = started.version or version
    elif lease.state != _working_state(start_event):
        store.release_lease(lease, conn=conn)
        return
    if rng.random() < stall_rate:
        # A stalled agent (a slow model call, a GC pause): its lease runs out meanwhile.
        time.sleep(ttl.total_seconds() * 1.5)
    store.transition(
        stream_id,
        finish_event,
        expected_state=_working_state(start_event),
        expected_version=version,
        lease_epoch=lease.epoch,
        idempotency_key=f"{name}:{finish_event}:{version}",
        actor=actor,
        reason=f"{role} finished",
        data={"by": name},
        release_lease=True,
        conn=conn,
    )
    report.applied[finish_event] += 1


def check_history(store: Store, conn: psycopg.Connection[Any]) -> list[str]:
    """Invariant violations over the whole history: every ticket went through the
    lifecycle (or, if a run stopped before it finished, the start of it) exactly once, in
    order, with contiguous versions."""
    rows = conn.execute(
        query("machine_history"), {"tenant": store.tenant, "machine": "Ticket"}
    ).fetchall()
    per_ticket: dict[str, list[tuple[int, str]]] = {}
    for stream_id, version, event_type in rows:
        per_ticket.setdefault(stream_id, []).append((version, event_type))
    problems = []
    for stream_id, events in sorted(per_ticket.items()):
        versions = [v for v, _ in events]
        types = [t for _, t in events]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"{stream_id}: versions not contiguous: {versions}")
        if types != LIFECYCLE[: len(types)]:
            problems.append(f"{stream_id}: steps {types} are not the lifecycle once, in order")
    return problems


def count_by_state(store: Store, conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute(query("count_by_state"), {"tenant": store.tenant, "machine": "Ticket"})
    return {state: count for state, count in rows.fetchall()}


@dataclass
class DemoResult:
    tickets: int
    resolved: int
    applied: Counter[str]
    rejected: Counter[str]
    violations: list[str]
    seconds: float


def run_scenario(
    dsn: str,
    *,
    tickets: int = 300,
    agents: int = 6,
    stall_rate: float = 0.03,
    lease_ttl: float = 0.5,
    deadline: float = 300.0,
    progress: Callable[[dict[str, int], float], None] | None = None,
) -> DemoResult:
    """Create ``tickets`` tickets and let ``agents`` processes (roles in turn: classifier,
    drafter, escalator) drive them to resolved; then check the history."""
    store = Store(dsn)
    store.migrate()
    store.register(Ticket)
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        # Numbered after every ticket there is, finished or not: an earlier run stopped
        # by its deadline leaves some unresolved, and their ids are taken.
        by_state = count_by_state(store, conn)
        first, resolved_before = sum(by_state.values()), by_state.get("resolved", 0)
        ids = [ticket_id(first + n) for n in range(tickets)]
        for stream_id in ids:
            store.create(stream_id, Ticket, data={"subject": f"request {stream_id}"}, conn=conn)
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        results = context.Queue()
        roles = list(ROLES)
        processes = [
            context.Process(
                target=run_agent,
                args=(dsn, roles[i % len(roles)], f"{roles[i % len(roles)]}-{i}", stop, results),
                kwargs={"lease_ttl": lease_ttl, "stall_rate": stall_rate, "seed": i},
                daemon=True,
            )
            for i in range(agents)
        ]
        started = time.monotonic()
        for process in processes:
            process.start()
        target = first + tickets
        counts: dict[str, int] = {}
        while time.monotonic() - started < deadline:
            counts = count_by_state(store, conn)
            if progress is not None:
                progress(counts, time.monotonic() - started)
            if counts.get("resolved", 0) >= target:
                break
            time.sleep(0.25)
        stop.set()
        reports = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        elapsed = time.monotonic() - started
        applied: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        for report in reports:
            applied.update(report.applied)
            rejected.update(report.rejected)
        violations = check_history(store, conn)
        resolved = count_by_state(store, conn).get("resolved", 0) - resolved_before
    store.close()
    return DemoResult(tickets, resolved, applied, rejected, violations, elapsed)


def _print_progress(out: TextIO) -> Callable[[dict[str, int], float], None]:
    order = [
        "new",
        "classifying",
        "classified",
        "drafting",
        "draft_ready",
        "escalating",
        "resolved",
    ]

    interactive = out.isatty()
    last_line = [-1.0]

    def show(counts: dict[str, int], elapsed: float) -> None:
        line = "  ".join(f"{state} {counts.get(state, 0):>4}" for state in order)
        if interactive:
            out.write(f"\r[{elapsed:6.1f}s] {line}")
        elif elapsed - last_line[0] >= 1.0:
            # Piped output gets one line a second instead of carriage returns.
            last_line[0] = elapsed
            out.write(f"[{elapsed:6.1f}s] {line}\n")
        out.flush()

    return show


def main(dsn: str | None, tickets: int, agents: int, out: TextIO = sys.stdout) -> int:
    server = None
    if dsn is None:
        from pgstate._embedded import EmbeddedPostgres

        out.write("No PGSTATE_DSN given: starting an embedded PostgreSQL...\n")
        server = EmbeddedPostgres().start()
        dsn = server.url()
    try:
        out.write(
            f"Triage: {tickets} tickets, {agents} agent processes (classifiers, drafters, "
            f"escalators); a few agents stall past their lease on purpose.\n"
        )
        result = run_scenario(dsn, tickets=tickets, agents=agents, progress=_print_progress(out))
        out.write("\n\n")
        out.write(f"Resolved {result.resolved}/{result.tickets} tickets in {result.seconds:.1f}s\n")
        out.write(
            "Steps applied: "
            + ", ".join(f"{k} {v}" for k, v in sorted(result.applied.items()))
            + "\n"
        )
        out.write("Rejected attempts by reason (each one a write the database refused):\n")
        for reason, count in result.rejected.most_common():
            out.write(f"  {reason:<22} {count}\n")
        if not result.rejected:
            out.write("  none\n")
        if result.violations:
            out.write(f"Invariant check: FAILED, {len(result.violations)} violations\n")
            for line in result.violations[:20]:
                out.write(f"  {line}\n")
            return 1
        out.write(
            "Invariant check: OK - every ticket went through each step exactly once, in "
            "order, with contiguous versions; no late or stale write landed.\n"
        )
        return 0 if result.resolved == result.tickets else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(os.environ.get("PGSTATE_DSN"), 300, 6))
