"""One name for the challenger's seat in disputes of both kinds

Inference disputes stored the seat of the verifier whose audit is contested as "verifier"
(in `waiting` and as a key of `answers`); training disputes called it "challenger". The one
dispute shell calls it "challenger" in both: stored values are rewritten (the column is
still `verifier_id`). Plain reads and writes of the JSON columns, so that SQLite and
PostgreSQL take the same path.

Revision ID: 0010_dispute_seats
Revises: 0009_key_revocation
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_dispute_seats"
down_revision = "0009_key_revocation"
branch_labels = None
depends_on = None

disputes = sa.table(
    "trust_disputes",
    sa.column("id", sa.String()),
    sa.column("waiting", sa.JSON()),
    sa.column("answers", sa.JSON()),
)


def _rename(old: str, new: str) -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(disputes.c.id, disputes.c.waiting, disputes.c.answers))
    for id_, waiting, answers in list(rows):
        waiting, answers = list(waiting or []), dict(answers or {})
        if old not in waiting and old not in answers:
            continue
        bind.execute(
            disputes.update()
            .where(disputes.c.id == id_)
            .values(
                waiting=[new if w == old else w for w in waiting],
                answers={new if k == old else k: v for k, v in answers.items()},
            )
        )


def upgrade() -> None:
    _rename("verifier", "challenger")


def downgrade() -> None:
    _rename("challenger", "verifier")
