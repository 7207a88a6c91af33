"""pgstate 0007: a batch's events checked in the insert that stores them (append_v1)."""

from pgstate.migrate import apply_migration

revision = "pgstate_0007"
down_revision = "pgstate_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0007_batch_checks_in_insert")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
