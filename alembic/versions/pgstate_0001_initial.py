"""pgstate 0001: streams, events, append and read functions."""

from pgstate.migrate import apply_migration

revision = "pgstate_0001"
down_revision = None
branch_labels = ("pgstate",)
depends_on = None


def upgrade() -> None:
    apply_migration("0001_initial")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
