"""disputes over failed audits: bisection rounds, deadlines, referee and ruling

Revision ID: 0007_disputes
Revises: 0006_training
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_disputes"
down_revision = "0006_training"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trust_disputes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("audit_id", sa.String(length=64), nullable=False),
        sa.Column("provider_id", sa.String(length=64), nullable=False),
        sa.Column("verifier_id", sa.String(length=64), nullable=False),
        sa.Column("referee_id", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("lo", sa.Integer(), nullable=False),
        sa.Column("hi", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("waiting", sa.JSON(), nullable=False),
        sa.Column("answers", sa.JSON(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("rounds", sa.JSON(), nullable=False),
        sa.Column("excluded", sa.JSON(), nullable=False),
        sa.Column("ruling", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("audit_id"),
    )
    op.create_index("ix_trust_disputes_provider_id", "trust_disputes", ["provider_id"])
    op.create_index("ix_trust_disputes_verifier_id", "trust_disputes", ["verifier_id"])
    op.create_index("ix_trust_disputes_state", "trust_disputes", ["state"])
    with op.batch_alter_table("trust_audits") as b:
        b.add_column(sa.Column("expired", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("trust_nodes") as b:
        b.add_column(
            sa.Column("verifier_expired", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("trust_commitments") as b:
        b.add_column(sa.Column("part", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("trust_commitments") as b:
        b.drop_column("part")
    with op.batch_alter_table("trust_nodes") as b:
        b.drop_column("verifier_expired")
    with op.batch_alter_table("trust_audits") as b:
        b.drop_column("expired")
    op.drop_table("trust_disputes")
