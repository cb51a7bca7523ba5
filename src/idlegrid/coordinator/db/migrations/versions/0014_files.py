"""The Files API: one row per stored file (issue 17); the content lives in the file store

Revision ID: 0014_files
Revises: 0013_attempt_committed
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_files"
down_revision = "0013_attempt_committed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_files_key_created", "files", ["key_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_files_key_created", table_name="files")
    op.drop_table("files")
