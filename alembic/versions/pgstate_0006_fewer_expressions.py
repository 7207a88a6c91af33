"""pgstate 0006: fewer PL/pgSQL expressions per transition (transition_v3's body)."""

from pgstate.migrate import apply_migration

revision = "pgstate_0006"
down_revision = "pgstate_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0006_fewer_expressions")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
