"""training disputes: a provider contests a failed segment audit

Revision ID: 0008_train_disputes
Revises: 0007_disputes
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_train_disputes"
down_revision = "0007_disputes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "train_disputes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("audit_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("segment_id", sa.String(length=96), nullable=False),
        sa.Column("provider_id", sa.String(length=64), nullable=False),
        sa.Column("verifier_id", sa.String(length=64), nullable=False),
        sa.Column("referee_id", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("round_s", sa.Float(), nullable=False),
        sa.Column("moves", sa.JSON(), nullable=False),
        sa.Column("checkpoint", sa.LargeBinary(), nullable=True),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("excluded", sa.JSON(), nullable=False),
        sa.Column("ruling", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("audit_id"),
    )
    op.create_index("ix_train_disputes_job_id", "train_disputes", ["job_id"])
    op.create_index("ix_train_disputes_provider_id", "train_disputes", ["provider_id"])
    op.create_index("ix_train_disputes_verifier_id", "train_disputes", ["verifier_id"])
    op.create_index("ix_train_disputes_state", "train_disputes", ["state"])


def downgrade() -> None:
    op.drop_index("ix_train_disputes_state", table_name="train_disputes")
    op.drop_index("ix_train_disputes_verifier_id", table_name="train_disputes")
    op.drop_index("ix_train_disputes_provider_id", table_name="train_disputes")
    op.drop_index("ix_train_disputes_job_id", table_name="train_disputes")
    op.drop_table("train_disputes")
