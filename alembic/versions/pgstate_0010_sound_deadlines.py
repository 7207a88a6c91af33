"""pgstate 0010: deadlines that can always fire, migrations that survive concurrent writers,
and leases that can be given up on a finished instance."""

from pgstate.migrate import apply_migration

revision = "pgstate_0010"
down_revision = "pgstate_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0010_sound_deadlines")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
