"""pgstate 0012: the operator's calls (instance migrations, the notification mode,
unparking, a rebuild's forced projection claim) need the new role pgstate_admin."""

from pgstate.migrate import apply_migration

revision = "pgstate_0012"
down_revision = "pgstate_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0012_operator_role")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
