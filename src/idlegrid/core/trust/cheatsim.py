"""What a rational cheater earns under the audit policy: a seeded Monte Carlo. Pure.

A provider serves requests of price R (all amounts in units of R) and cheats on each one
with probability `cheat_rate`, saving `gain` per cheat. Each request is audited with the
policy's rate for the provider's history and stake (`AuditPolicy.rate`); an audited cheat
is caught with probability d·(1−ρ). A catch costs the whole stake S (slashed in full) and
the held accrual F; the provider restakes S to keep serving paid work (serving paid
inference requires stake). It is ejected when the failure falls in probation
(`AuditPolicy.failure_ejects`) or the spoofer posterior crosses its bound
(`ReputationModel.ejected`), and then earns nothing more.

Profit is the cheater's gain over serving honestly: gains from cheats minus stakes and
accruals lost. Unaudited requests are skipped in one draw (the gap to the next audit is
geometric: the rate only changes at an audit), so a run costs one step per audit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from idlegrid.core.trust.economics import AuditPolicy
from idlegrid.core.trust.reputation import ReputationModel


@dataclass(frozen=True)
class CheatOutcome:
    """A cheat rate's result over `runs` cheaters of `requests` requests each."""

    cheat_rate: float
    runs: int
    requests: int
    mean_profit: float  # in units of R, over serving honestly
    profit_se: float  # standard error of the mean
    ejected_share: float  # share of runs ejected within `requests`
    ejected_by: int | None  # requests by which `quantile` of runs were ejected (None: not all)
    quantile: float


def _gap(rng: random.Random, rate: float) -> int:
    """Requests up to and including the next audited one, at a constant rate."""
    if rate >= 1.0:
        return 1
    u = 1.0 - rng.random()  # (0, 1]
    return int(math.log(u) / math.log1p(-rate)) + 1


def one_run(
    policy: AuditPolicy,
    reputation: ReputationModel,
    cheat_rate: float,
    requests: int,
    rng: random.Random,
    stake: float | None = None,
) -> tuple[float, int | None]:
    """One cheater: (profit over honest, the request number it was ejected at or None)."""
    s = policy.stake if stake is None else stake
    catch = policy.detect * (1 - policy.rho)
    served, profit = 0, 0.0
    passed = failed = clean = 0
    while served < requests:
        k = _gap(rng, policy.rate(clean, failed, s))
        if served + k > requests:  # the horizon ends before the next audit
            profit += policy.gain * cheat_rate * (requests - served)
            break
        served += k
        # Unaudited requests in the gap: gains at their expected value (the mean is exact).
        profit += policy.gain * cheat_rate * (k - 1)
        cheated = rng.random() < cheat_rate
        if cheated:
            profit += policy.gain
        if cheated and rng.random() < catch:
            profit -= s + policy.forfeit
            ejected = policy.failure_ejects(clean, failed) or reputation.ejected(passed, failed + 1)
            failed, clean = failed + 1, 0
            if ejected:
                return profit, served
        else:
            passed, clean = passed + 1, clean + 1
    return profit, None


def simulate(
    cheat_rate: float,
    *,
    policy: AuditPolicy | None = None,
    reputation: ReputationModel | None = None,
    requests: int = 100_000,
    runs: int = 1_000,
    seed: int = 0,
    stake: float | None = None,
    quantile: float = 0.99,
) -> CheatOutcome:
    """Mean profit and ejection time of `runs` cheaters at `cheat_rate` (deterministic)."""
    pol = policy or AuditPolicy()
    rep = reputation or ReputationModel()
    rng = random.Random(f"{seed}:{cheat_rate}:{stake}")
    profits: list[float] = []
    ejections: list[float] = []
    for _ in range(runs):
        profit, at = one_run(pol, rep, cheat_rate, requests, rng, stake)
        profits.append(profit)
        ejections.append(math.inf if at is None else at)
    mean = sum(profits) / runs
    var = sum((p - mean) ** 2 for p in profits) / max(runs - 1, 1)
    ejections.sort()
    q = ejections[max(0, math.ceil(quantile * runs) - 1)]
    return CheatOutcome(
        cheat_rate,
        runs,
        requests,
        mean,
        math.sqrt(var / runs),
        sum(1 for e in ejections if e != math.inf) / runs,
        None if q == math.inf else int(q),
        quantile,
    )
