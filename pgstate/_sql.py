"""Named statements loaded from sql/queries/*.sql, so no SQL lives in Python strings."""

from __future__ import annotations

import re
from functools import cache
from typing import LiteralString, cast

from pgstate._resources import sql_dir

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    statements: dict[str, str] = {}
    marks = list(_NAME_LINE.finditer(text))
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        body_lines = [
            line
            for line in text[mark.end() : end].splitlines()
            if line.strip() and not line.lstrip().startswith("--")
        ]
        name = mark.group(1)
        if name in statements:
            raise ValueError(f"statement {name!r} is defined twice in sql/queries")
        statements[name] = "\n".join(body_lines)
    return statements


@cache
def _all_statements() -> dict[str, str]:
    statements: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, body in _parse(path.read_text(encoding="utf-8")).items():
            if name in statements:
                raise ValueError(f"statement {name!r} is defined in two files of sql/queries")
            statements[name] = body
    return statements


def query(name: str) -> LiteralString:
    """The SQL text of a named statement; the files are trusted package data."""
    try:
        return cast(LiteralString, _all_statements()[name])  # type: ignore[redundant-cast]
    except KeyError:
        raise KeyError(f"no statement named {name!r} in sql/queries") from None


def statement_names() -> list[str]:
    return sorted(_all_statements())
