"""A batch line's task keeps its answer (text, logprobs) when it settles

Revision ID: 0022_task_answers
Revises: 0018_batches
"""

import sqlalchemy as sa
from alembic import op

revision = "0022_task_answers"
down_revision = "0018_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("answer", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("answer")
