"""Bayesian spoofer probability from audit history, and the routing weight it implies.

As Inference.net does: a provider is either honest (audits fail only by accident, at rate
ε) or a spoofer (audits fail at rate q). Each audit updates the posterior P(spoofer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ReputationModel:
    """Prior and likelihoods of the two-hypothesis model."""

    prior: float = 0.05  # share of new providers assumed to be spoofers
    honest_fail: float = 1e-4  # ε: deliberately far above the measured honest rate
    spoofer_fail: float = 0.5  # q: a spoofer that cheats on half its requests
    eject_at: float = 0.9  # posterior at which a provider is ejected

    def posterior(self, passed: int, failed: int) -> float:
        """P(spoofer | `passed` clean audits and `failed` failed ones), in log space."""
        log_s = (
            math.log(self.prior)
            + passed * math.log1p(-self.spoofer_fail)
            + failed * math.log(self.spoofer_fail)
        )
        log_h = (
            math.log1p(-self.prior)
            + passed * math.log1p(-self.honest_fail)
            + failed * math.log(self.honest_fail)
        )
        hi = max(log_s, log_h)
        return math.exp(log_s - hi) / (math.exp(log_s - hi) + math.exp(log_h - hi))

    def weight(self, passed: int, failed: int) -> float:
        """Routing weight in [0, 1]: the probability the provider is honest."""
        return 1.0 - self.posterior(passed, failed)

    def ejected(self, passed: int, failed: int) -> bool:
        """True once the provider is more likely than `eject_at` to be a spoofer."""
        return self.posterior(passed, failed) >= self.eject_at
