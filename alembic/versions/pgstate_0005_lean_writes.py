"""pgstate 0005: leaner transitions and single-event appends (declared result types)."""

from pgstate.migrate import apply_migration

revision = "pgstate_0005"
down_revision = "pgstate_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0005_lean_writes")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
