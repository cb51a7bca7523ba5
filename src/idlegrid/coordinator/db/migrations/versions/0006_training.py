"""training: jobs, segments, held checkpoints, audits and job history (issue 6)

Revision ID: 0006_training
Revises: 0005_hwproofs
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_training"
down_revision = "0005_hwproofs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "train_jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("committed_step", sa.Integer(), nullable=False),
        sa.Column("verified_step", sa.Integer(), nullable=False),
        sa.Column("escrow", sa.Integer(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("excluded", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("lease_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_train_jobs_key_id", "train_jobs", ["key_id"])
    op.create_index("ix_train_jobs_state", "train_jobs", ["state"])
    op.create_table(
        "train_segments",
        sa.Column("id", sa.String(length=96), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("start_step", sa.Integer(), nullable=False),
        sa.Column("end_step", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("root", sa.String(length=64), nullable=False),
        sa.Column("det_class", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("cause", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_train_segments_job_id", "train_segments", ["job_id"])
    op.create_index("ix_train_segments_node_id", "train_segments", ["node_id"])
    op.create_index("ix_train_segments_state", "train_segments", ["state"])
    op.create_table(
        "train_checkpoints",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "step"),
    )
    op.create_table(
        "train_audits",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("segment_id", sa.String(length=96), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
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
    op.create_index("ix_train_audits_job_id", "train_audits", ["job_id"])
    op.create_index("ix_train_audits_node_id", "train_audits", ["node_id"])
    op.create_index("ix_train_audits_state", "train_audits", ["state"])
    op.create_table(
        "train_events",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("cause", sa.String(length=200), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_train_events_job_id", "train_events", ["job_id"])
    op.create_table(
        "train_probes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_train_probes_job_id", "train_probes", ["job_id"])
    op.create_index("ix_train_probes_node_id", "train_probes", ["node_id"])
    op.create_index("ix_train_probes_state", "train_probes", ["state"])


def downgrade() -> None:
    op.drop_table("train_probes")
    op.drop_table("train_events")
    op.drop_table("train_audits")
    op.drop_table("train_checkpoints")
    op.drop_table("train_segments")
    op.drop_table("train_jobs")
