"""Response models of the trust API: audits, inference disputes, hardware proofs, trust
status (disputes of both kinds: `dispute_schemas.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from idlegrid.coordinator.schemas import Number


class AuditVerdict(BaseModel):
    """A judged inference audit (POST /audits/{id}/report)."""

    audit_id: str
    passed: bool
    reasons: list[str]
    worst_rel: Number | None
    worst_margin: Number | None
    first_bad_chunk: int | None
    tolerance: Number
    provider_class: str
    verifier_class: str
    # Whether the audit was a canary is the coordinator's to know (operator view: `Audit`).
    positions: list[int] | None = None  # failed audits: where a dispute would bisect
    # Embedding audits: worst_rel is the largest |difference| of an element, worst_margin
    # the least cosine, first_bad_chunk the first input off (repeated here by name).
    kind: Literal["embedding"] | None = None
    worst_abs: Number | None = None
    worst_cos: Number | None = None
    first_bad_input: int | None = None
    tolerance_cos: Number | None = None


class Audit(BaseModel):
    """An audit and its verdict (operator view)."""

    id: str
    task_id: str
    attempt: int
    node_id: str
    verifier_id: str | None
    canary: bool
    state: str
    verdict: dict[str, Any] | None
    expired: list[str]


class AuditList(BaseModel):
    """GET /audits."""

    audits: list[Audit]


class InferenceDispute(BaseModel):
    """A dispute over a failed inference audit: bisection rounds and ruling."""

    id: str
    kind: Literal["inference"]
    audit_id: str
    provider_id: str
    challenger_id: str
    referee_id: str | None
    panel: list[str] = []  # the drawn verifiers (the referee seat)
    votes: dict[str, str] = {}  # panelist -> "provider" | "challenger"
    awaiting_since: float = 0.0  # waiting for enough eligible verifiers since
    state: str
    round: int
    positions: int
    interval: list[int]
    waiting_for: list[str]
    rounds: list[dict[str, Any]]
    ruling: dict[str, Any]
    reason: str
    created_at: Number
    done_at: Number


class InferenceDisputeQuery(BaseModel):
    """What the current round of an inference dispute asks of the caller, with the audited
    request (`kind` here is the request's: chat or completion)."""

    dispute_id: str
    round: int
    role: str
    position: int
    deadline_in_s: Number
    task_id: str
    attempt: int
    audit_id: str
    model: str
    kind: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    prior_ids: list[int]
    max_new_tokens: int
    stop: list[str]
    commitment: str
    # An embedding answer's inputs, a constrained answer's grammar: without them a referee
    # recomputes something else than what was served.
    input: list[str] | list[list[int]] | None = None
    grammar: dict[str, str] | None = None


class HwStart(BaseModel):
    """A hardware challenge's seed, revealed (the clock starts)."""

    id: str
    kind: str
    claimed: str
    seed: str
    spec: dict[str, Any]


class HwCommit(BaseModel):
    """Matmul: the rows to open. Memory: the chase seed."""

    id: str
    rows: list[int] | None = None
    chase_seed: str | None = None


class HwVerdict(BaseModel):
    """A judged hardware proof; matmul and memory proofs report different measures."""

    id: str
    passed: bool
    elapsed_s: Number
    budget_s: Number
    reasons: list[str]
    # matmul
    correct: bool | None = None
    in_time: bool | None = None
    worst_error: Number | None = None
    proven_tflops: Number | None = None
    proven_class: str | None = None
    # memory
    wrong_samples: int | None = None
    bytes: int | None = None


class HwProof(BaseModel):
    """A hardware proof and its verdict (operator view)."""

    id: str
    node_id: str
    claimed: str
    kind: str
    state: str
    reason: str | None
    verdict: dict[str, Any] | None
    done_at: float = 0.0  # when it was judged, the coordinator's clock (0 while open)


class HwProofList(BaseModel):
    """GET /hwproofs."""

    proofs: list[HwProof]


class DisputeSummary(BaseModel):
    """An inference dispute as /status shows it."""

    id: str
    audit_id: str
    provider_id: str
    challenger_id: str
    referee_id: str | None
    panel: list[str] = []  # the drawn verifiers (the referee seat)
    votes: dict[str, str] = {}  # panelist -> "provider" | "challenger"
    awaiting_since: float = 0.0  # waiting for enough eligible verifiers since
    state: str
    round: int
    waiting_for: list[str]
    provider_right: bool | None


class TrustNodeStatus(BaseModel):
    """A node's audit record, as provider and as verifier."""

    audit_rate: Number
    probation: bool
    passed: int
    failed: int
    verifier: bool
    verifier_passed: int
    verifier_failed: int
    spoofer_probability: Number
    verifier_expired: int
    ejected: bool
    det_class: str | None
    verifiable: bool = False  # an independent live verifier of its kernel family exists
    held_accrual: int = 0  # µcr not paid out: not verifiable for a whole audit window
    probation_budget_left: int | None = None  # µcr of paid work left; None: not limited


class TrustStatus(BaseModel):
    """Audit rates, pending audits, recent disputes and each node's record."""

    disputes: list[DisputeSummary]
    pending_audits: dict[str, int]
    p_star: Number
    p_steady: Number
    canary_rate: Number
    probation_budget_ucr: int = -1
    beacon_commitment: str
    nodes: dict[str, TrustNodeStatus]
