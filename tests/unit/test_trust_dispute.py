"""Pure dispute logic: positions, agreement at one position, and the ruling's entries."""

from __future__ import annotations

import dataclasses

import numpy as np

from idlegrid.core import ledger
from idlegrid.core.trust import bisect, dispute, entries
from idlegrid.core.trust import commitment as cm

TOL = cm.Tolerance(rel=1e-3, rank_slack=1e-3, margin=1e-3)


def _commit_and_report(n: int = 40) -> tuple[cm.Commitment, cm.Report]:
    states = np.random.default_rng(1).standard_normal((n, 8)).astype(np.float32)
    ents, chunks = [], []
    for j in range(0, n, cm.CHUNK_SIZE):
        rows = states[j : j + cm.CHUNK_SIZE].reshape(-1)
        k = cm.k_for(len(states[j : j + cm.CHUNK_SIZE]))
        idx = np.argsort(-np.abs(rows), kind="stable")[:k]
        ents.append(([int(i) for i in idx], [float(rows[i]) for i in idx]))
        kth = float(np.abs(rows[idx[-1]]))
        m = len(states[j : j + cm.CHUNK_SIZE])
        chunks.append(
            cm.ChunkReport(tuple(float(rows[i]) for i in idx), kth, (0.5,) * m, (True,) * m)
        )
    c = cm.build(
        "tiny", "t/1", [2, 5], 7, 0.0, 1.0, list(range(3, 3 + n)), ents, "length", False, 8
    )
    return c, cm.Report(cm.context_hash([2, 5]), tuple(chunks), True)


def test_positions_are_chunks_and_the_finish_claim() -> None:
    c, r = _commit_and_report(40)
    assert dispute.n_positions(c) == 4  # 16 + 16 + 8 tokens, then the finish claim
    assert dispute.disagreeing(c, r, TOL) == []
    bad = dataclasses.replace(r.chunks[1], values=tuple(v * 1.01 for v in r.chunks[1].values))
    lie = dataclasses.replace(r, chunks=(r.chunks[0], bad, r.chunks[2]), end_ok=False)
    assert dispute.disagreeing(c, lie, TOL) == [1, 3]
    one = dispute.only_position(lie, 1, len(c.chunks))
    assert len(one.chunks) == 1 and dispute.faults_at(c, 1, one, TOL)
    assert not dispute.faults_at(c, 0, dispute.only_position(lie, 0, 3), TOL)
    assert dispute.faults_at(c, 3, dispute.only_position(lie, 3, 3), TOL)  # finish claim
    other = dataclasses.replace(r, context_hash=cm.context_hash([9]))
    assert dispute.disagreeing(c, other, TOL) == [0, 1, 2, 3]  # another prompt: everywhere
    # An answer of the wrong shape for its position never counts as agreement.
    assert dispute.faults_at(c, 1, dispute.only_position(r, 3, 3), TOL)
    assert dispute.truncated(c, 1).chunks == c.chunks[:2]
    assert dispute.truncated(c, 3) is c


def test_bisection_ends_on_a_disputed_position_even_if_agreement_is_not_monotone() -> None:
    # Parties agree at 0 and 2, disagree at 1 and 3 (claimed): the search still ends on a
    # position with a "disagree" on record, next to one with an "agree".
    agree = {0: True, 1: False, 2: True}
    b = bisect.Bisection(5, -1, 3)
    while not b.done:
        b.answer(agree[b.query()])
    assert b.first_bad in (1, 3) and agree.get(b.first_bad) is not True


def _books() -> tuple[dict[str, int], list[ledger.Entry]]:
    stake, acc = ledger.stake_account("p", "cpu"), ledger.accrual_account("p")
    books = {
        ledger.ISSUER: -2000,
        stake: 500,
        acc: 300,
        ledger.FEES: 200,
        ledger.stake_account("v", "cpu"): 1000,
    }
    s = entries.slash("aud:x", stake, 500, 500, "consumer:k", 80, "v")
    f = entries.forfeit("aud", acc, 300, "consumer:k", 0)
    pay = entries.verifier_pay("aud", "v", 20, 200)
    out = [e for e in (s, f, pay) if e is not None]
    after = books
    for e in out:
        after = ledger.apply(after, e)
    return after, out


def test_reversal_restores_the_stake_in_full_when_everyone_still_holds_it() -> None:
    after, originals = _books()
    e, used = dispute.reversal("d", originals, after, {ledger.stake_account("v", "cpu"): 1000})
    assert e is not None and e.key == "reverse:d" and e.cause.kind == "dispute" and not used
    back = ledger.apply(after, e)
    assert (
        back[ledger.stake_account("p", "cpu")] == 500 and back[ledger.accrual_account("p")] == 300
    )
    assert back.get("consumer:k", 0) == 0 and back[ledger.provider_account("v")] == 0


def test_reversal_takes_what_was_spent_from_the_false_verifier_and_never_overdraws() -> None:
    after, originals = _books()
    spent = dict(after)
    spent["consumer:k"] = 10  # the consumer spent most of its refund meanwhile
    spent[ledger.ISSUER] -= 10 - after["consumer:k"]
    cover = {ledger.stake_account("v", "cpu"): 1000}
    e, used = dispute.reversal("d", originals, spent, cover)
    assert e is not None and used == {ledger.stake_account("v", "cpu"): 70}
    back = ledger.apply(spent, e)  # raises if any account went negative
    assert back[ledger.stake_account("p", "cpu")] == 500 and back["consumer:k"] == 0
    pen = dispute.penalty("d", {ledger.stake_account("v", "cpu"): 930}, "p")
    back = ledger.apply(back, pen[0])
    assert back[ledger.stake_account("v", "cpu")] == 0
    assert back[ledger.provider_account("p")] == 465
    # Nothing left anywhere to cover it: the provider gets back what could be collected.
    poor = {
        k: (0 if k in ("consumer:k", ledger.provider_account("v")) else v) for k, v in after.items()
    }
    e2, _ = dispute.reversal("d2", originals, poor, {})
    assert e2 is not None
    assert sum(p.amount for p in e2.postings if p.amount > 0) < 800


def test_fees_and_pay_are_capped_by_what_is_held() -> None:
    assert dispute.referee_pay("d", "r", 50, 0) is None
    assert dispute.dispute_fee("d", "p", 50, 0) is None
    e = dispute.dispute_fee("d", "p", 50, 20)
    assert e is not None and dict((p.account, p.amount) for p in e.postings)[ledger.FEES] == 20
