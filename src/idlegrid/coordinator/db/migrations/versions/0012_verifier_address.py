"""Verifier selection: each trust node's peer address, and whether it holds a lapsed audit

`address` is the network address a node registered from (a verifier never audits a
provider on its own network); `held` marks a verifier that let an audit lapse and has not
reported since (skipped by the draw). Plain added columns with server defaults, so SQLite
(batch mode) and PostgreSQL take the same path.

Revision ID: 0012_verifier_address
Revises: 0011_dispute_panels
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_verifier_address"
down_revision = "0011_dispute_panels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trust_nodes") as batch:
        batch.add_column(sa.Column("address", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("trust_nodes") as batch:
        batch.drop_column("held")
        batch.drop_column("address")
