"""A provider's lease controls (what one lease and all of them may take, outbound network,
pip, runtimes), stored with its market supply

Revision ID: 0024_lease_controls
Revises: 0023_lease_loss
"""

import sqlalchemy as sa
from alembic import op

revision = "0024_lease_controls"
down_revision = "0023_lease_loss"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_market") as batch:
        batch.add_column(sa.Column("lease", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("node_market") as batch:
        batch.drop_column("lease")
