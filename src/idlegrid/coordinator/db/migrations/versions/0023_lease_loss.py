"""A lease lost with its provider can be restarted elsewhere: the flag, and the links
between the lost lease and the one that replaced it; the hardware proofs a lease started on

Revision ID: 0023_lease_loss
Revises: 0022_task_answers
"""

import sqlalchemy as sa
from alembic import op

revision = "0023_lease_loss"
down_revision = "0022_task_answers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.add_column(
            sa.Column("restart_on_loss", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("restarted_from", sa.String(64), nullable=True))
        batch.add_column(sa.Column("restarted_as", sa.String(64), nullable=True))
        batch.add_column(sa.Column("proofs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("proofs")
        batch.drop_column("restarted_as")
        batch.drop_column("restarted_from")
        batch.drop_column("restart_on_loss")
