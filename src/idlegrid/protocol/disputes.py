"""Node API messages of the one dispute route family (`/api/v1/disputes`), for both kinds.

A provider opens a dispute over a failed audit of either kind; every seat (provider,
challenger, referee) then asks for its round and answers it through the same two routes.
Which answer fields matter depends on the kind, the seat and the round (see each game:
`coordinator/trust/disputes.py`, `coordinator/training/disputes.py`). Protocol version 2.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from idlegrid.protocol.messages import Message
from idlegrid.protocol.training import MAX_B64

DisputeKind = Literal["inference", "training"]


class DisputeOpenMsg(Message):
    """A provider contests a failed audit of its own work (an answer or a segment)."""

    kind: DisputeKind
    audit_id: str = Field(min_length=1, max_length=64)
    reason: str = Field("", max_length=500)


class DisputeQueryMsg(Message):
    """A seat asks what the current round of a dispute wants of it."""

    round: int = Field(ge=1)


class DisputeAnswerMsg(Message):
    """One round's answer.

    Inference: the provider opens its committed chunk (`chunk`, base64 leaf bytes, and its
    Merkle path `siblings`/`right`); the challenger and the referee send their recomputation
    of the position (`report`, base64 of core/trust/report_codec.encode_report, one chunk).
    Training: claim/steps `state_hash`; ops-commit `n_ops`, `root`, `link` (the last) and
    its path; ops `link` and its path; records `record`; the provider's hand-over
    `checkpoint`; the referee `det_class`, `start_hash` and `record` or `state_hash`.
    """

    round: int = Field(ge=1)
    chunk: str = Field("", max_length=1 << 16)
    siblings: list[str] = Field(default_factory=list, max_length=64)
    right: list[bool] = Field(default_factory=list, max_length=64)
    report: str = Field("", max_length=1 << 16)
    state_hash: str = Field("", max_length=128)
    start_hash: str = Field("", max_length=128)
    n_ops: int | None = Field(None, ge=0, le=1_000_000)
    root: str = Field("", max_length=128)
    link: str = Field("", max_length=128)
    record: str = Field("", max_length=1 << 20)
    checkpoint: str = Field("", max_length=MAX_B64)
    det_class: str = Field("", max_length=200)
