"""Attempts record whether a commitment covers their output (issue 15: no pay without one)

Revision ID: 0013_attempt_committed
Revises: 0012_verifier_address
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_attempt_committed"
down_revision = "0012_verifier_address"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("task_attempts") as batch:
        batch.add_column(sa.Column("committed", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_attempts") as batch:
        batch.drop_column("committed")
