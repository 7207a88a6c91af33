"""pgstate 0008: version conflicts of appends answered as rows (append_v2, append_one_v3).

Revision pgstate_0007 is left unused: a development build carried a withdrawn migration
under that id, and a database that ran it must stop with an unknown revision rather than
count as up to date without this one.
"""

from pgstate.migrate import apply_migration

revision = "pgstate_0008"
down_revision = "pgstate_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0008_conflicts_as_rows")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
