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
    """How often requests are audited, for a provider with a given audit history.

    Probation: a new provider is audited on every request until `full_audits` clean audits,
    then the rate halves every `halving` further clean audits down to the steady rate
    `safety × p*`. A failure during probation ejects (`failure_ejects`). A failure after
    probation (the provider survived it: its stake was slashed) starts probation again:
    full audits for `full_audits × (1 + failed)` clean audits, and a steady rate doubled
    per failure.

    The steady rate is per request: p* depends on the stake at risk in units of that
    request's price (`stake`), so a small stake or a large request is audited more often,
    and a cheat has negative expected value at every stake level.
    """

    gain: float = 1.0  # G, in units of the request price R (a cheat saves at most the work)
    detect: float = 0.99  # d, design value; measured ≥ 0.999 per cheat in the cheat matrix
    rho: float = 0.1  # ρ, lazy or colluding verifiers (canaries keep this small)
    stake: float = 100.0  # S in units of R
    forfeit: float = 1.0  # F in units of R (accrual held for the audit window, at least R)
    safety: float = 2.0
    full_audits: int = 8
    halving: float = 8.0
    max_failures: int = 3  # the failure that reaches this count ejects, in or out of probation

    @property
    def p_star(self) -> float:
        """p* for this policy."""
        return p_star(self.gain, self.detect, self.rho, self.stake, self.forfeit)

    @property
    def steady(self) -> float:
        """The audit rate after probation, with no failure and the default stake."""
        return self.steady_at()

    def steady_at(self, failed: int = 0, stake: float | None = None) -> float:
        """The steady rate after `failed` failures, for a stake of `stake` × the request's
        price (the policy's `stake` when None): safety × p*, doubled per failure."""
        s = self.stake if stake is None else max(0.0, stake)
        base = p_star(self.gain, self.detect, self.rho, s, self.forfeit)
        return min(1.0, self.safety * base * 2.0 ** min(failed, 64))

    def rate(self, clean_audits: int, failed: int = 0, stake: float | None = None) -> float:
        """Audit probability for the next request of a provider.

        `clean_audits` counts clean audits since its last failed one (all of them when none
        failed); `failed` its failed audits; `stake` the stake at risk in units of this
        request's price (None: the policy's default).
        """
        full = self.full_audits * (1 + failed)
        if clean_audits < full:
            return 1.0
        decay: float = 0.5 ** ((clean_audits - full) / self.halving)
        return max(self.steady_at(failed, stake), min(1.0, decay))

    def on_probation(self, clean_audits: int, failed: int = 0) -> bool:
        """True while the rate (at the default stake) is above steady."""
        return self.rate(clean_audits, failed) > self.steady_at(failed)

    def failure_ejects(self, clean_audits: int, failed: int = 0) -> bool:
        """Whether a failed audit now ejects: it does during probation (the documented rule),
        and the `max_failures`-th does anywhere, whatever the reputation model says (it
        assumes a cheater that fails half its audits; one cheating on 1% of its requests
        would pass it forever). `clean_audits`/`failed` are before this one."""
        return failed + 1 >= self.max_failures or self.on_probation(clean_audits, failed)


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
