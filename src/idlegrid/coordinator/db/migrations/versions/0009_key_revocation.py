"""API keys can be revoked

Revision ID: 0009_key_revocation
Revises: 0008_train_disputes
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_key_revocation"
down_revision = "0008_train_disputes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("revoked_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("revoked_at")
