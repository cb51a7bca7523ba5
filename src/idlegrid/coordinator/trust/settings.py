"""The trust domain's knobs: IDLEGRID_TRUST_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrustSettings(BaseSettings):
    """Trust knobs; IDLEGRID_TRUST_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="IDLEGRID_TRUST_", extra="ignore")

    stake_multiple: float = Field(100.0, gt=0, description="S in units of a request's price")
    full_audits: int = Field(8, ge=0)
    halving: float = Field(8.0, gt=0)
    # Canaries per real audit drawn (φ, a share of audits, not of answers): an answer is a
    # canary with probability φ × its provider's audit rate, so every verifier sees the same
    # share of canaries from every provider, and canaries cost φ of what audits cost rather
    # than a fixed share of all generation (2 % of answers was more than the audits).
    canary_rate: float = Field(0.1, ge=0, le=1)
    audit_fee_bps: int = Field(1000, ge=0, description="verifier pay, bps of the request charge")
    # A verifier that took an audit and did not report within this long loses it (unpaid),
    # `hold_slash_bps` of each stake account, and its turn in later draws until it reports
    # again; the audit is drawn again without it.
    audit_expiry_s: float = Field(60.0, gt=0)
    hold_slash_bps: int = Field(500, ge=0, le=10_000)
    # Nodes on the coordinator's own host (loopback) are the operator's: not "one network".
    exempt_loopback: bool = True
    # Each party to a dispute answers a round within this long, or loses.
    dispute_answer_s: float = Field(30.0, gt=0)
    # Tolerances: see docs/trust.md for how they were calibrated.
    rel_same: float = 2e-5
    rel_cross: float = 1e-4
    margin: float = 1e-3
    # Embedding audits: largest element-wise difference of unit vectors and least cosine.
    # Honest: ≤ 1.6e-7 (threads 1 vs 2, batched vs one by one); bf16: ≥ 1.3e-3, cos ≤
    # 0.99997; half the layers: ≥ 0.37 (docs/trust.md).
    embed_abs: float = Field(2e-5, gt=0)
    embed_cos: float = Field(0.99999, gt=0, le=1)
    # A provider no independent verifier can check (none of its kernel family is live) is
    # routed paid work only while its held accrual is below this (µcr); -1: no limit (a
    # local grid whose operator runs every provider).
    probation_budget_ucr: int = Field(500_000, ge=-1)
