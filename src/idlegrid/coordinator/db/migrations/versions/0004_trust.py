"""trust: commitments, audits, per-node audit record

Revision ID: 0004_trust
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_trust"
down_revision = "0003_energy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trust_commitments",
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("prior_ids", sa.JSON(), nullable=False),
        sa.Column("max_new", sa.Integer(), nullable=False),
        sa.Column("charge", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "attempt"),
    )
    op.create_index("ix_trust_commitments_node_id", "trust_commitments", ["node_id"])
    op.create_table(
        "trust_audits",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("designated", sa.String(length=64), nullable=True),
        sa.Column("verifier_id", sa.String(length=64), nullable=True),
        sa.Column("canary", sa.Boolean(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("assigned_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_trust_audits_task_id", "trust_audits", ["task_id"])
    op.create_index("ix_trust_audits_node_id", "trust_audits", ["node_id"])
    op.create_index("ix_trust_audits_state", "trust_audits", ["state"])
    op.create_table(
        "trust_nodes",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("verifier", sa.Boolean(), nullable=False),
        sa.Column("det_class", sa.String(length=200), nullable=False),
        sa.Column("passed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("verifier_passed", sa.Integer(), nullable=False),
        sa.Column("verifier_failed", sa.Integer(), nullable=False),
        sa.Column("ejected", sa.Boolean(), nullable=False),
        sa.Column("proven_class", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )


def downgrade() -> None:
    op.drop_table("trust_nodes")
    op.drop_table("trust_audits")
    op.drop_table("trust_commitments")
