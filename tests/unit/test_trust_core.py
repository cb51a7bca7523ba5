"""Pure trust maths: Merkle trees, beacon selection, economics, reputation, entries, bisection."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core import ledger
from idlegrid.core.ledger import Cause, Posting
from idlegrid.core.trust import beacon, bisect, economics, entries, merkle
from idlegrid.core.trust.reputation import ReputationModel

blobs = st.lists(st.binary(max_size=40), min_size=1, max_size=40)


@given(blobs, st.data())
def test_every_leaf_proves_into_the_root_and_no_other_data_does(leaves, data) -> None:
    root = merkle.merkle_root(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle.merkle_proof(leaves, i)
    assert merkle.verify_proof(root, leaves[i], proof)
    assert not merkle.verify_proof(root, leaves[i] + b"x", proof)


@given(blobs, st.data())
def test_changing_any_leaf_changes_the_root(leaves, data) -> None:
    i = data.draw(st.integers(0, len(leaves) - 1))
    changed = list(leaves)
    changed[i] = changed[i] + b"\x01"
    assert merkle.merkle_root(changed) != merkle.merkle_root(leaves)


def test_a_leaf_cannot_pose_as_an_inner_node() -> None:
    a, b = b"left", b"right"
    inner = merkle.node_hash(merkle.leaf_hash(a), merkle.leaf_hash(b))
    assert merkle.merkle_root([a, b]) == inner
    assert merkle.merkle_root([merkle.leaf_hash(a) + merkle.leaf_hash(b)]) != inner


def test_beacon_selection_rate_matches_p_and_depends_on_every_committed_byte() -> None:
    secret = b"epoch-secret"
    digests = [i.to_bytes(32, "big") for i in range(20_000)]
    hits = sum(beacon.selected(secret, d, 0.05) for d in digests)
    # Binomial(20000, 0.05): mean 1000, sd ~31; 5 sd either side.
    assert 845 < hits < 1155
    assert beacon.selected(secret, digests[0], 1.0)
    assert not any(beacon.selected(secret, d, 0.0) for d in digests[:100])
    draws = {beacon.draw(secret, d) for d in digests[:100]}
    assert len(draws) == 100
    assert beacon.draw(b"other", digests[0]) != beacon.draw(secret, digests[0])


def test_verifier_pick_is_uniform_and_never_outside_the_candidates() -> None:
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(3000):
        counts[beacon.pick(b"s", i.to_bytes(4, "big"), ["c", "a", "b"])] += 1
    assert all(900 < v < 1100 for v in counts.values())


def test_p_star_is_the_break_even_audit_rate() -> None:
    p = economics.p_star(gain=1.0, detect=0.99, rho=0.1, stake=10.0, forfeit=1.0)
    assert p == pytest.approx(1 / (0.99 * 0.9 * 11))
    assert economics.cheat_profit(p, 1.0, 0.99, 0.1, 10.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert economics.cheat_profit(2 * p, 1.0, 0.99, 0.1, 10.0, 1.0) < 0
    assert economics.cheat_profit(p / 2, 1.0, 0.99, 0.1, 10.0, 1.0) > 0


@settings(max_examples=300)
@given(
    st.floats(0.01, 10),
    st.floats(0.5, 1.0),
    st.floats(0, 0.5),
    st.floats(1, 1000),
    st.floats(0, 100),
)
def test_cheating_loses_money_at_the_steady_rate(gain, detect, rho, stake, forfeit) -> None:
    policy = economics.AuditPolicy(gain=gain, detect=detect, rho=rho, stake=stake, forfeit=forfeit)
    if policy.steady < 1.0:
        profit = economics.cheat_profit(policy.steady, gain, detect, rho, stake, forfeit)
        assert profit < 0
    # Repeated cheats before settlement: every extra cheat is another independent bet.
    for m in (1, 5, 50):
        caught = economics.detection_within(policy.steady, detect * (1 - rho), m)
        assert caught <= 1.0


def test_probation_starts_at_full_audits_and_decays_to_steady() -> None:
    policy = economics.AuditPolicy()
    rates = [policy.rate(n) for n in range(0, 200)]
    assert rates[: policy.full_audits] == [1.0] * policy.full_audits
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] == pytest.approx(policy.steady)
    assert policy.on_probation(0) and not policy.on_probation(199)


def test_false_slash_probability_formula_and_bound() -> None:
    # With no confirmation step the formula is 1 − (1 − p ε)^N.
    direct = economics.false_slash_probability(1000, 0.1, 0.01, 1.0)
    assert direct == pytest.approx(1 - (1 - 0.001) ** 1000)
    # Design point (docs/trust.md): a million requests at the steady rate.
    p = economics.AuditPolicy().steady
    # Audit and confirming recompute each need a false-fail rate below ~6.7e-6 for 1e-6.
    assert economics.false_slash_probability(1_000_000, p, 6e-6, 6e-6) <= 1e-6
    assert economics.false_slash_probability(1_000_000, p, 1e-4, 1e-4) > 1e-6
    assert economics.false_slash_probability(10, 0.0, 0.5, 0.5) == 0.0


def test_tail_fit_gives_small_rate_for_distant_margins_and_large_for_close_ones() -> None:
    far = [3.0 + 0.1 * math.sin(i) for i in range(100)]
    near = [0.1 + 0.2 * math.sin(i) for i in range(100)]
    assert economics.tail_fail_rate(far) < 1e-12
    assert economics.tail_fail_rate(near) > 0.1


def test_reputation_ejects_a_first_failure_and_trusts_long_clean_history() -> None:
    model = ReputationModel()
    assert model.posterior(0, 0) == pytest.approx(model.prior)
    assert model.ejected(0, 1)
    assert model.posterior(20, 0) < model.posterior(5, 0) < model.prior
    assert model.weight(50, 0) > 0.999
    # An honest provider's single unlucky failure after a long clean record: not ejected.
    assert not model.ejected(200, 1)


def _fund(balances, account, amount):
    entry = ledger.make_entry(
        f"fund:{account}",
        Cause("test", account),
        [Posting(ledger.ISSUER, -amount), Posting(account, amount)],
    )
    return ledger.apply(balances, entry)


def test_slash_refunds_consumer_pays_verifier_burns_rest_and_balances() -> None:
    stake = ledger.stake_account("n1", "cpu")
    books = _fund({}, stake, 1000)
    e = entries.slash("a1", stake, 1000, 800, "consumer:k", refund=100, verifier="v1")
    assert e is not None and e.key == "slash:a1" and e.cause == Cause("audit", "a1")
    books = ledger.apply(books, e)
    ledger.check_invariants(books)
    assert books[stake] == 200
    assert books["consumer:k"] == 100
    assert books[ledger.provider_account("v1")] == 350
    assert books[ledger.FEES] == 350


def test_slash_never_takes_more_than_the_stake_and_nothing_from_empty() -> None:
    e = entries.slash("a", "stake:n:cpu", 50, 800, "consumer:k", refund=100, verifier=None)
    assert e is not None and dict((p.account, p.amount) for p in e.postings)["stake:n:cpu"] == -50
    assert entries.slash("a", "stake:n:cpu", 0, 800, "consumer:k", 100, None) is None


def test_forfeit_reversal_and_verifier_pay() -> None:
    acc = ledger.accrual_account("n1")
    stake = ledger.stake_account("n1", "cpu")
    books = _fund(_fund({}, acc, 300), stake, 500)
    s = entries.slash("a", stake, 500, 500, "consumer:k", 50, "v")
    f = entries.forfeit("a", acc, 300, "consumer:k", refund_left=0)
    assert f is not None
    after = ledger.apply(ledger.apply(books, s), f)
    assert after[acc] == 0
    back = ledger.apply(after, entries.dispute_reversal("d", s, f))
    assert {k: v for k, v in back.items() if v} == {k: v for k, v in books.items() if v}
    fees = {ledger.FEES: 10, ledger.ISSUER: -10}
    pay = entries.verifier_pay("a", "v", 25, fees[ledger.FEES])
    assert pay is not None
    assert ledger.apply(fees, pay)[ledger.FEES] == 0
    assert entries.verifier_pay("a", "v", 25, 0) is None


@given(st.integers(1, 5000), st.data())
def test_bisection_finds_the_first_fault_in_log_rounds(n, data) -> None:
    bad = data.draw(st.integers(0, n - 1))
    first, rounds = bisect.run(n, lambda i: i < bad)
    assert first == bad
    assert rounds <= bisect.max_rounds(n)


def test_referee_ruling() -> None:
    assert bisect.settle(3, provider_ok=True, challenger_ok=False).provider_right
    assert not bisect.settle(3, provider_ok=False, challenger_ok=False).provider_right
    with pytest.raises(ValueError):
        bisect.Bisection(0)
