"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from pgstate.migrate import apply_migration

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    apply_migration("NNNN_slug")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
