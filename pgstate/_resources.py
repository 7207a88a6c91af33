"""Locate the SQL and Alembic files, installed (package data) or in a source checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _locate(installed_name: str, checkout_name: str) -> Path:
    # A wheel carries the files inside the package; an editable install reads the checkout.
    installed = _PACKAGE_DIR / installed_name
    if installed.is_dir():
        return installed
    checkout = _PACKAGE_DIR.parent / checkout_name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"pgstate cannot find its {checkout_name}/ directory")


@cache
def sql_dir() -> Path:
    return _locate("_sql", "sql")


@cache
def alembic_dir() -> Path:
    return _locate("_alembic", "alembic")


def schema_files() -> list[Path]:
    """The files of sql/schema/ (the current truth), in the order they apply."""
    return sorted((sql_dir() / "schema").glob("*.sql"))


def migration_files() -> list[Path]:
    """The immutable migration history, oldest first."""
    return sorted((sql_dir() / "migrations").glob("*.sql"))


def migration_sql(name: str) -> str:
    """The text of one migration, by its file stem (for example ``0001_initial``)."""
    path = sql_dir() / "migrations" / f"{name}.sql"
    return path.read_text(encoding="utf-8")
