"""API keys carry a spend cap and request and token rate limits

Revision ID: 0017_key_limits
Revises: 0016_leases
"""

import sqlalchemy as sa
from alembic import op

revision = "0017_key_limits"
down_revision = "0016_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("spend_cap", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tpm", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("tpm")
        batch.drop_column("rpm")
        batch.drop_column("spend_cap")
