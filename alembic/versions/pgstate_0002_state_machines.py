"""pgstate 0002: machine registry, transition_v1, leases, deadlines, audit of rejections."""

from pgstate.migrate import apply_migration

revision = "pgstate_0002"
down_revision = "pgstate_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0002_state_machines")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
