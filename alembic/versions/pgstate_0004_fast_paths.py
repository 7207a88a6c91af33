"""pgstate 0004: a scalar single-event append and leaner transitions."""

from pgstate.migrate import apply_migration

revision = "pgstate_0004"
down_revision = "pgstate_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0004_fast_paths")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
