"""Training gangs: the measured latency of each node's links, read by the gang planner

Revision ID: 0025_training_gangs
Revises: 0023_lease_loss
"""

import sqlalchemy as sa
from alembic import op

revision = "0025_training_gangs"
down_revision = "0024_lease_controls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_market") as batch:
        batch.add_column(
            sa.Column("link_latency_ms", sa.JSON(), nullable=False, server_default="{}")
        )


def downgrade() -> None:
    with op.batch_alter_table("node_market") as batch:
        batch.drop_column("link_latency_ms")
