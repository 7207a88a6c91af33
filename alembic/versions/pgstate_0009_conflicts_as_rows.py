"""pgstate 0009: version conflicts of appends answered as rows (append_v2, append_one_v3).

Revisions pgstate_0007 and pgstate_0008 are left unused: development commits carried
withdrawn versions of this work under those ids, and a database that ran one of them must
stop at a revision this release does not know rather than count as up to date.
"""

from pgstate.migrate import apply_migration

revision = "pgstate_0009"
down_revision = "pgstate_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0009_conflicts_as_rows")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
