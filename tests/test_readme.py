"""The README's Python blocks run, in order, against a fresh database."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_readme_has_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "pgstate demo" in text
    assert "python -m pytest -q" in text


def test_readme_python_blocks_run(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    monkeypatch.setenv("PGSTATE_DSN", fresh_db)
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, block in enumerate(blocks, start=1):
        code = compile(block, f"README.md python block {number}", "exec")
        exec(code, namespace)
    store = namespace["store"]
    close = getattr(store, "close", None)
    assert callable(close)
    close()
