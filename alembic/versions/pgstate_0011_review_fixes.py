"""pgstate 0011: timeouts fire without a client-visible idempotency key; append retries
keep their order; re-registering a known definition answers with its version; stricter
guards, creates, leases and instance migrations."""

from pgstate.migrate import apply_migration

revision = "pgstate_0011"
down_revision = "pgstate_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0011_review_fixes")


def downgrade() -> None:
    raise NotImplementedError("pgstate migrations are forward-only")
