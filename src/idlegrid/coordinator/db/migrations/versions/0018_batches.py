"""Batches and their lines (issue 17); a routing priority on tasks (batch lines yield)

Revision ID: 0018_batches
Revises: 0017_key_limits
"""

import sqlalchemy as sa
from alembic import op

revision = "0018_batches"
down_revision = "0017_key_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        *(
            sa.Column(f"{s}_at", sa.Float(), nullable=True)
            for s in (
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        ),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("escrow", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_batches_key_created", "batches", ["key_id", "created_at", "id"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id"), primary_key=True),
        sa.Column("line", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("hold", sa.BigInteger(), nullable=False),
        sa.Column("prompt_price", sa.BigInteger(), nullable=False),
        sa.Column("output_price", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
    )
    op.create_index("ix_batch_lines_state", "batch_lines", ["batch_id", "state"])
    # A provider's batch setting, advertised at registration.
    op.add_column(
        "nodes", sa.Column("batch", sa.Boolean(), nullable=False, server_default=sa.true())
    )
    op.add_column("nodes", sa.Column("batch_price_bps", sa.Integer(), nullable=True))
    # 0 for interactive requests, 1 for batch lines: a provider claims lower first.
    op.add_column("tasks", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("tasks", "priority")
    op.drop_column("nodes", "batch_price_bps")
    op.drop_column("nodes", "batch")
    op.drop_index("ix_batch_lines_state", table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_key_created", table_name="batches")
    op.drop_table("batches")
