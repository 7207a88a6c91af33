"""Where the time of one transition goes: round trips, the statements transition_v3 runs,
time in lock wait, in the function body, and in the client.

Starts an embedded PostgreSQL with pg_stat_statements (track = all) and function
tracking, runs sequential transitions on one connection, and prints a breakdown.

    python benchmarks/profile_transition.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import psycopg
from scale import Toggle, toggle_store  # the same machine as the scale benchmark

from pgstate._connect import libpq_dsn
from pgstate._embedded import EmbeddedPostgres

STATEMENTS = """
SELECT calls, mean_exec_time * 1000 AS mean_us, left(regexp_replace(query, '\\s+', ' ', 'g'), 90),
       query LIKE '%%pgstate.transition_v3(%%' AS top_level
  FROM pg_stat_statements
 WHERE calls >= %(calls)s AND query NOT LIKE '%%pg_stat%%'
 ORDER BY total_exec_time DESC
"""
FUNCTIONS = """
SELECT funcname, calls, self_time / calls * 1000, total_time / calls * 1000
  FROM pg_stat_user_functions WHERE calls >= %(calls)s ORDER BY total_time DESC
"""


def backend_cpu_ns(pid: int) -> int:
    """CPU time the backend has run, from the kernel's scheduler statistics (same machine)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as stats:
        return int(stats.read().split()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    server = EmbeddedPostgres(
        settings={
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "all",
            "track_functions": "all",
        }
    ).start()
    try:
        dsn = server.url()
        store = toggle_store(dsn)
        with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            instances = [f"toggle-{n}" for n in range(100)]
            for stream in instances:
                store.create(stream, Toggle, conn=conn)
            conn.execute("SELECT pg_stat_statements_reset()")
            conn.execute("SELECT pg_stat_reset()")
            lock_waits: list[int] = []
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert backend is not None
            server_cpu_before = backend_cpu_ns(backend[0])
            client_cpu_before = time.process_time()
            started = time.perf_counter()
            for index in range(args.calls):
                round_number = index // 100
                result = store.transition(
                    instances[index % 100],
                    "switch_on" if round_number % 2 == 0 else "switch_off",
                    expected_version=round_number + 1,
                    conn=conn,
                )
                lock_waits.append(result.lock_wait_us or 0)
            elapsed_us = (time.perf_counter() - started) / args.calls * 1e6
            client_cpu_us = (time.process_time() - client_cpu_before) / args.calls * 1e6
            server_cpu_us = (backend_cpu_ns(backend[0]) - server_cpu_before) / args.calls / 1e3
            time.sleep(0.6)  # function statistics are flushed to the view asynchronously
            statements: list[Any] = conn.execute(STATEMENTS, {"calls": args.calls // 2}).fetchall()
            functions: list[Any] = conn.execute(FUNCTIONS, {"calls": args.calls // 2}).fetchall()
        store.close()
    finally:
        server.stop()
    top = [s for s in statements if s[3]]
    nested = [s for s in statements if not s[3]]
    function_us = next((f[3] for f in functions if f[0] == "transition_v3"), 0.0)
    print(f"transitions: {args.calls}, sequential, one connection, durable embedded PostgreSQL")
    if top:
        print(f"round trips per transition: {top[0][0] / args.calls:.0f}")
    print(f"client-observed time per transition: {elapsed_us:.0f} us")
    print(f"  in transition_v3 (server, incl. nested statements): {function_us:.0f} us")
    print(f"  lock wait (measured inside the function): {sum(lock_waits) / len(lock_waits):.1f} us")
    print(f"  client, driver, network and commit (WAL flush): {elapsed_us - function_us:.0f} us")
    print(f"    client CPU (pgstate + psycopg, this process): {client_cpu_us:.0f} us")
    print(f"    server CPU (the backend, function and commit included): {server_cpu_us:.0f} us")
    rest = elapsed_us - client_cpu_us - server_cpu_us
    print(f"    neither (waiting: WAL flush, wake-ups, network): {rest:.0f} us")
    print(f"statements executed inside transition_v3 per call: {len(nested)}")
    for calls, mean_us, text, _ in nested:
        print(f"  {mean_us:7.1f} us  x{calls / args.calls:.2f}  {text}")
    print("functions (self / total us per call):")
    for name, calls, self_us, total_us in functions:
        print(f"  {name:24s} x{calls / args.calls:.2f}  {self_us:7.1f} / {total_us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
