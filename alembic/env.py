"""Alembic environment for pgstate's own migrations (version table in schema pgstate)."""

from alembic import context
from pgstate.migrate import run_environment

run_environment(context)
