"""pgstate 0007: version conflicts of appends answered as rows (append_v2, append_one_v3)."""

from pgstate.migrate import apply_migration

revision = "pgstate_0007"
down_revision = "pgstate_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0007_conflicts_as_rows")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
