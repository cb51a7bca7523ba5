"""Disputes settled by a panel: its members, their votes, and since when it waits

Both dispute tables (inference `trust_disputes`, training `train_disputes`) get `panel`
(the drawn verifiers), `votes` (node -> "provider" | "challenger") and `awaiting_since`
(when the dispute began waiting for enough eligible verifiers; 0 when it is not). Plain
columns with server defaults, so that SQLite and PostgreSQL take the same path and
existing rows read as an empty panel.

Revision ID: 0011_dispute_panels
Revises: 0010_dispute_seats
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_dispute_panels"
down_revision = "0010_dispute_seats"
branch_labels = None
depends_on = None

TABLES = ("trust_disputes", "train_disputes")


def upgrade() -> None:
    for name in TABLES:
        op.add_column(name, sa.Column("panel", sa.JSON(), nullable=False, server_default="[]"))
        op.add_column(name, sa.Column("votes", sa.JSON(), nullable=False, server_default="{}"))
        op.add_column(
            name, sa.Column("awaiting_since", sa.Float(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name) as batch:
            batch.drop_column("awaiting_since")
            batch.drop_column("votes")
            batch.drop_column("panel")
