"""The audit policy after a failure, and the cheater simulation: negative profit at every
cheat rate and stake level, ejection within a stated number of requests."""

from __future__ import annotations

import pytest

from idlegrid.core.trust.cheatsim import simulate
from idlegrid.core.trust.economics import AuditPolicy
from idlegrid.core.trust.reputation import ReputationModel


def test_a_failure_in_probation_ejects_even_where_the_posterior_would_not() -> None:
    policy, rep = AuditPolicy(), ReputationModel()
    # Five clean audits then a failure: the posterior stays below 0.9 (the old bug) ...
    assert not rep.ejected(5, 1)
    # ... but the provider was on probation, so the failure ejects.
    assert policy.on_probation(5) and policy.failure_ejects(5, 0)
    assert not policy.failure_ejects(200, 0)  # a veteran survives one failure


def test_a_failure_raises_the_audit_rate() -> None:
    policy = AuditPolicy()
    assert policy.rate(200) == pytest.approx(policy.steady)
    # After a failure the clean count restarts: full audits again, for twice as long.
    assert all(policy.rate(n, failed=1) == 1.0 for n in range(16))
    assert policy.steady_at(1) == pytest.approx(2 * policy.steady)
    assert policy.rate(10_000, failed=1) == pytest.approx(2 * policy.steady)
    assert policy.on_probation(20, failed=1)
    # The max_failures-th failure ejects anywhere.
    assert policy.failure_ejects(10_000, failed=2)


def test_the_rate_follows_the_stake_per_request() -> None:
    policy = AuditPolicy()
    assert policy.rate(500, stake=10.0) > policy.rate(500, stake=100.0)
    assert policy.rate(500, stake=0.0) == 1.0  # nothing at risk: everything is audited
    # Each cheat loses money at the steady rate, whatever the stake.
    for s in (1.0, 3.0, 10.0, 100.0, 1e4):
        p = policy.steady_at(stake=s)
        assert policy.gain - p * policy.detect * (1 - policy.rho) * (s + policy.forfeit) < 0


@pytest.mark.parametrize("stake", [10.0, 100.0])
@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2, 1.0])
def test_cheating_loses_money_and_is_ejected(rate: float, stake: float) -> None:
    out = simulate(rate, requests=200_000, runs=200, seed=1, stake=stake)
    assert out.mean_profit + 3 * out.profit_se < 0
    assert out.ejected_share == 1.0
    assert out.ejected_by is not None and out.ejected_by <= 60_000


def test_the_simulation_is_deterministic() -> None:
    assert simulate(0.03, runs=50, seed=7) == simulate(0.03, runs=50, seed=7)
