"""market: device offers, node region and links, orders

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_offers",
        sa.Column("node_id", sa.String(length=64), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("device_model", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("vram_gb", sa.Float(), nullable=False),
        sa.Column("price_h", sa.BigInteger(), nullable=False),
        sa.Column("plugin", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("node_id", "device_model"),
    )
    op.create_table(
        "node_market",
        sa.Column("node_id", sa.String(length=64), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("links", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("body_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("budget", sa.BigInteger(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("refunded", sa.BigInteger(), nullable=False),
        sa.Column("placement", sa.JSON(), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ends_at", sa.Float(), nullable=True),
        sa.Column("accrued_until", sa.Float(), nullable=True),
        sa.Column("accrual_seq", sa.Integer(), nullable=False),
        sa.Column("tokens_done", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_orders_key_id", "orders", ["key_id"])
    op.create_index("ix_orders_state", "orders", ["state"])


def downgrade() -> None:
    op.drop_index("ix_orders_state", "orders")
    op.drop_index("ix_orders_key_id", "orders")
    op.drop_table("orders")
    op.drop_table("node_market")
    op.drop_table("device_offers")
