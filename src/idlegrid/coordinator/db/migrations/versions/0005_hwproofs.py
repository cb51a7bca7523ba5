"""hardware proofs: matmul and memory challenges per node and claimed device class

Revision ID: 0005_hwproofs
Revises: 0004_trust
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_hwproofs"
down_revision = "0004_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hw_proofs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("claimed", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("seed", sa.String(length=64), nullable=False),
        sa.Column("root", sa.String(length=64), nullable=False),
        sa.Column("wanted", sa.JSON(), nullable=False),
        sa.Column("verdict", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.Column("committed_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_hw_proofs_node_id", "hw_proofs", ["node_id"])
    op.create_index("ix_hw_proofs_state", "hw_proofs", ["state"])


def downgrade() -> None:
    op.drop_table("hw_proofs")
