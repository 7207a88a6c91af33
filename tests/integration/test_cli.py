"""The pgstate command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pgstate.migrate import head
from pgstate.testing import cloned_database

PGSTATE = [sys.executable, "-m", "pgstate.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGSTATE, *args], capture_output=True, text=True, timeout=120)


def test_migrate_check_and_inspect(pgstate_server: str) -> None:
    with cloned_database(pgstate_server, "template0") as url:
        assert run("check", "--dsn", url).returncode == 1
        migrated = run("migrate", "--dsn", url)
        assert migrated.returncode == 0, migrated.stderr
        assert head() in migrated.stdout
        assert run("migrate", "--dsn", url).returncode == 0
        checked = run("check", "--dsn", url)
        assert checked.returncode == 0 and head() in checked.stdout
        missing = run("inspect", "nothing-here", "--dsn", url)
        assert missing.returncode == 1 and "no stream" in missing.stdout


def test_diagram_and_sql() -> None:
    mermaid = run("diagram", "pgstate.triage:Ticket")
    assert mermaid.returncode == 0
    assert mermaid.stdout.startswith("stateDiagram-v2\n    [*] --> new\n")
    assert "classifying --> new: give_up_classifying (after 5m)" in mermaid.stdout
    dot = run("diagram", "pgstate.triage:Ticket", "--format", "dot")
    assert '"resolved" [shape=doublecircle];' in dot.stdout
    bad = run("diagram", "pgstate.triage")
    assert bad.returncode != 0
    sql = run("sql")
    assert sql.returncode == 0
    for path in sorted((Path(__file__).parents[2] / "sql" / "migrations").glob("*.sql")):
        assert f"-- {path.name}" in sql.stdout
