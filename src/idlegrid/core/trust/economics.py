"""The audit rate that makes cheating lose money, the probation schedule, and the
false-slash bound for honest providers.

Notation per request (research note §7.9): G the cheater's gain, d the probability an audit
detects the cheat, ρ the probability the verifier is lazy or colludes, S the stake slashed
and F the escrowed earnings forfeited on detection. One cheat loses money in expectation
when G < p·d·(1−ρ)·(S+F), hence p* = G / (d(1−ρ)(S+F)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def p_star(gain: float, detect: float, rho: float, stake: float, forfeit: float) -> float:
    """The smallest audit rate at which one cheat has non-positive expected profit."""
    if not 0 < detect <= 1 or not 0 <= rho < 1:
        raise ValueError("need 0 < detect <= 1 and 0 <= rho < 1")
    at_risk = detect * (1 - rho) * (stake + forfeit)
    if at_risk <= 0:
        return 1.0
    return min(1.0, gain / at_risk)


def cheat_profit(
    p: float, gain: float, detect: float, rho: float, stake: float, forfeit: float
) -> float:
    """Expected profit of cheating once at audit rate p (negative: cheating loses)."""
    return gain - p * detect * (1 - rho) * (stake + forfeit)


@dataclass(frozen=True)
class AuditPolicy:
    """How often requests are audited, for a provider with a given clean history.

    Probation: a new provider is audited on every request until `full_audits` clean audits,
    then the rate halves every `halving` further clean audits down to the steady rate
    `safety × p*`. A failed audit ends the provider (ejection), so there is no way back up.
    """

    gain: float = 1.0  # G, in units of the request price R (a cheat saves at most the work)
    detect: float = 0.99  # d, design value; measured ≥ 0.999 per cheat in the cheat matrix
    rho: float = 0.1  # ρ, lazy or colluding verifiers (canaries keep this small)
    stake: float = 100.0  # S in units of R
    forfeit: float = 1.0  # F in units of R (accrual held for the audit window, at least R)
    safety: float = 2.0
    full_audits: int = 8
    halving: float = 8.0

    @property
    def p_star(self) -> float:
        """p* for this policy."""
        return p_star(self.gain, self.detect, self.rho, self.stake, self.forfeit)

    @property
    def steady(self) -> float:
        """The audit rate after probation."""
        return min(1.0, self.safety * self.p_star)

    def rate(self, clean_audits: int) -> float:
        """Audit probability for the next request of a provider with this many clean audits."""
        if clean_audits < self.full_audits:
            return 1.0
        decay: float = 0.5 ** ((clean_audits - self.full_audits) / self.halving)
        return max(self.steady, min(1.0, decay))

    def on_probation(self, clean_audits: int) -> bool:
        """True while the rate is above steady."""
        return self.rate(clean_audits) > self.steady


def detection_within(p: float, detect: float, m: int) -> float:
    """Probability that at least one of m cheats is caught: 1 − (1 − p·d)^m."""
    return 1 - (1 - p * detect) ** m


def false_slash_probability(
    requests: int, audit_rate: float, fail_rate: float, confirm_rate: float
) -> float:
    """Probability an honest provider is ever slashed over `requests`.

    A slash needs the audit to fail (honest false-fail rate `fail_rate`) and the dispute's
    independent recompute to fail as well (`confirm_rate`), so per request the chance is
    p·ε_fail·ε_confirm; over N requests 1 − (1 − that)^N, computed stably.
    """
    per_request = audit_rate * fail_rate * confirm_rate
    if per_request <= 0:
        return 0.0
    return -math.expm1(requests * math.log1p(-per_request))


def gaussian_tail(z: float) -> float:
    """P(X > z) for a standard normal X."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def tail_fail_rate(log_margins: list[float]) -> float:
    """Per-audit false-fail rate from honest audits' log10(threshold / statistic).

    Fits a normal distribution to the honest log-margins (how many decades each honest
    statistic sits below its threshold) and returns the probability mass below zero:
    the chance an honest audit crosses the threshold. An empirical count of zero failures
    in n audits cannot say anything below ~3/n; the fit extrapolates the measured tail.
    """
    n = len(log_margins)
    if n < 2:
        raise ValueError("need at least two honest audits")
    mean = sum(log_margins) / n
    var = sum((x - mean) ** 2 for x in log_margins) / (n - 1)
    sd = math.sqrt(var) if var > 0 else 1e-12
    return gaussian_tail(mean / sd)
