"""energy: per-attempt energy and power samples (issue 7)

Revision ID: 0003_energy
Revises: 0002
Create Date: 2026-11-22 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_energy"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("task_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("energy_j", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("energy_estimated", sa.Boolean(), nullable=True))
    op.create_table(
        "power_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("joules_total", sa.Float(), nullable=False),
        sa.Column("watts", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("power_samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_power_samples_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_power_samples_t"), ["t"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("power_samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_power_samples_t"))
        batch_op.drop_index(batch_op.f("ix_power_samples_node_id"))
    op.drop_table("power_samples")
    with op.batch_alter_table("task_attempts", schema=None) as batch_op:
        batch_op.drop_column("energy_estimated")
        batch_op.drop_column("energy_j")
