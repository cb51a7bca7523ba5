"""Node API v1 messages for training jobs (issue 6), shared by the coordinator and agents.

Same rules as `protocol/messages.py`: additive changes only, unknown fields ignored.
Binary payloads (commitments, checkpoints) travel as base64 inside signed JSON bodies.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from idlegrid.protocol.messages import Message

MAX_B64 = 96 << 20  # a checkpoint of the small GPT is a few MB; this bounds a request


class TrainPollMsg(Message):
    """A training provider asks for a job to run (long poll)."""

    wait_s: float = Field(5.0, ge=0, le=60)
    det_class: str = Field("", max_length=200)
    # host:port this node would serve a data-parallel gang's rendezvous on as its rank 0;
    # empty: it takes single-provider jobs only.
    gang_addr: str = Field("", max_length=300)


class TrainWorkMsg(Message):
    """A job handed to a provider: start at `start_step` from `checkpoint` (None: step 0)."""

    job_id: str
    attempt: int
    spec: dict[str, Any]
    start_step: int
    checkpoint: str | None = None
    # Data-parallel jobs (spec.parallel > 1): this node's rank in the gang, the gang's size
    # and rank 0's rendezvous address. Only rank 0 holds the job (progress, commits).
    rank: int = 0
    world: int = 1
    rendezvous: str = ""


class TrainProgressMsg(Message):
    """Where the provider is now."""

    step: int = Field(ge=0)
    loss: float = Field(allow_inf_nan=False)
    tokens_per_s: float = Field(ge=0, allow_inf_nan=False)


class TrainCommitMsg(Message):
    """A finished segment: the signed commitment (core/training/proof) and its end checkpoint."""

    commitment: str = Field(min_length=1, max_length=MAX_B64)
    checkpoint: str = Field(min_length=1, max_length=MAX_B64)
    det_class: str = Field("", max_length=200)


class TrainReleaseMsg(Message):
    """The provider gives the job back (draining), or found the spec unrunnable."""

    reason: str = Field("", max_length=500)
    # unsuitable: this node cannot run it as specified (e.g. another determinism class)
    kind: Literal["handback", "invalid_request", "unsuitable"] = "handback"


class TrainAuditMsg(Message):
    """A segment to re-execute from the provider's own committed start checkpoint."""

    audit_id: str
    job_id: str
    spec: dict[str, Any]
    start_step: int
    end_step: int
    start_checkpoint: str | None = None  # None: the initial state derived from the spec
    end_checkpoint: str
    commitment: str  # what the provider committed (canaries: a planted wrong one)


class TrainAuditReportMsg(Message):
    """What the verifier recomputed: its own leaves, not just a yes or no."""

    leaves: str = Field(min_length=1, max_length=MAX_B64)  # base64 TrainingCommitment
    weight_distance: float | None = Field(None, ge=0, allow_inf_nan=False)
    det_class: str = Field("", max_length=200)
    # The provider's checkpoints hash to what it committed (start and end of the segment).
    checkpoints_match: bool = True


class TrainProbeAnswerMsg(Message):
    """A checkpoint the coordinator probed for (it must hash to the committed state)."""

    checkpoint: str = Field(min_length=1, max_length=MAX_B64)
