"""Leases that run (issue 18): the lease row and its transitions, each with its cause

Revision ID: 0016_leases
Revises: 0014_files
"""

import sqlalchemy as sa
from alembic import op

revision = "0016_leases"
down_revision = "0014_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("hours", sa.Float(), nullable=False),
        sa.Column("billed_s", sa.Integer(), nullable=False),
        sa.Column("message", sa.String(4000), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_leases_key_id", "leases", ["key_id"])
    op.create_index("ix_leases_node_id", "leases", ["node_id"])
    op.create_index("ix_leases_state", "leases", ["state"])
    op.create_table(
        "lease_transitions",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cause", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lease_transitions")
    op.drop_index("ix_leases_state", table_name="leases")
    op.drop_index("ix_leases_node_id", table_name="leases")
    op.drop_index("ix_leases_key_id", table_name="leases")
    op.drop_table("leases")
