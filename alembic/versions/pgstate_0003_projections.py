"""pgstate 0003: notification modes, projection checkpoints, parked events, snapshots."""

from pgstate.migrate import apply_migration

revision = "pgstate_0003"
down_revision = "pgstate_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0003_projections")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
