"""The training dispute game, pure: bisection over steps then ops, referee, timeouts."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core.training import dispute
from idlegrid.core.training.dispute import CHALLENGER, PROVIDER, Dispute, DisputeError
from idlegrid.core.training.proof import StepLeaf, TrainingCommitment
from idlegrid.core.trust.merkle import merkle_proof, merkle_root

START = b"\x07" * 32


def chain(n: int, bad_from: int | None, tag: bytes = b"") -> list[bytes]:
    """State hashes after each step; from `bad_from` on a faulty trajectory."""
    out, h = [], START
    for i in range(n):
        faulty = bad_from is not None and i >= bad_from
        h = hashlib.sha256(h + (b"bad" + tag if faulty else b"ok") + bytes([i])).digest()
        out.append(h)
    return out


def commitment(hashes: list[bytes], start: int = 100) -> TrainingCommitment:
    return TrainingCommitment(
        "job-d", start, [StepLeaf(start + i, h, 1.0) for i, h in enumerate(hashes)], START
    )


def ops(n: int, bad_op: int | None) -> list[bytes]:
    return [
        b"op%d" % i + (b"-bad" if bad_op is not None and i >= bad_op else b"") for i in range(n)
    ]


def referee_for(truth: list[bytes]) -> dispute.Referee:
    def referee(step: int, j: int | None, p: bytes, c: bytes) -> tuple[bool, bool]:
        assert j is not None
        return p == truth[j], c == truth[j]

    return referee


@given(st.integers(1, 64), st.data())
@settings(max_examples=80, deadline=None)
def test_the_game_lands_on_the_faulty_step_and_op_within_the_bound(k: int, data) -> None:
    t0 = data.draw(st.integers(0, k - 1))
    n_ops = data.draw(st.integers(1, 700))
    j0 = data.draw(st.integers(0, n_ops - 1))
    honest, cheat = chain(k, None), chain(k, t0)
    c = commitment(cheat)
    truth = ops(n_ops, None)
    out = dispute.play(
        c,
        honest,
        lambda party, step: ops(n_ops, j0) if party == PROVIDER else truth,
        referee_for(truth),
    )
    assert out.winner == CHALLENGER and out.provider_at_fault
    assert out.step == 100 + t0 and out.op_index == j0
    assert out.rounds <= dispute.rounds_bound(k, n_ops)


def test_an_honest_provider_wins_against_a_wrong_challenger() -> None:
    k, n_ops = 10, 500
    honest, wrong = chain(k, None), chain(k, 4, tag=b"c")
    truth = ops(n_ops, None)
    out = dispute.play(
        commitment(honest),
        wrong,
        lambda party, step: truth if party == PROVIDER else ops(n_ops, 321),
        referee_for(truth),
    )
    assert out.winner == PROVIDER and out.step == 104 and out.op_index == 321
    assert out.rounds <= dispute.rounds_bound(k, n_ops) == 4 + 9


def test_a_challenger_whose_replay_agrees_has_no_case() -> None:
    h = chain(8, None)
    d = Dispute.open(commitment(h), h[-1], now=0.0)
    assert d.outcome is not None and d.outcome.winner == PROVIDER


def test_an_extra_op_in_the_cheat_trace_is_found_where_the_traces_part() -> None:
    k = 8
    truth = ops(300, None)
    cheat_ops = truth[:120] + [b"noise-add"] + truth[120:]
    out = dispute.play(
        commitment(chain(k, 2)),
        chain(k, None),
        lambda party, step: cheat_ops if party == PROVIDER else truth,
        referee_for(truth),
    )
    assert out.winner == CHALLENGER and out.step == 102 and out.op_index == 120


def test_a_party_that_stops_answering_loses() -> None:
    c = commitment(chain(16, 5))
    honest = chain(16, None)
    d = Dispute.open(c, honest[-1], now=0.0, round_seconds=30)
    d.answer_step(honest[d.step_query() - 100], now=10)
    assert d.timeout(now=39) is None  # deadline is 10 + 30
    out = d.timeout(now=40)
    assert out is not None and out.winner == PROVIDER and "challenger" in out.reason
    with pytest.raises(DisputeError):
        d.answer_step(honest[0], now=41)
    # the provider goes silent at level 2
    d = Dispute.open(c, honest[-1], now=0.0, round_seconds=30)
    while d.phase == "steps":
        d.answer_step(honest[d.step_query() - 100], now=1)
    assert d.disputed_step == 105
    links = [hashlib.sha256(b"%d" % i).digest() for i in range(50)]
    d.commit_ops(CHALLENGER, 50, merkle_root(links), links[-1], merkle_proof(links, 49), now=2)
    out = d.timeout(now=32)
    assert out is not None and out.winner == CHALLENGER and out.provider_at_fault
    assert out.step == 105


def test_moves_out_of_turn_or_with_bad_proofs_are_refused_or_lose() -> None:
    c = commitment(chain(4, 1))
    honest = chain(4, None)
    d = Dispute.open(c, honest[-1], now=0.0)
    with pytest.raises(DisputeError):
        d.op_query()
    while d.phase == "steps":
        d.answer_step(honest[d.step_query() - 100], now=1)
    links = [hashlib.sha256(b"%d" % i).digest() for i in range(8)]
    bad_proof = merkle_proof(links, 3)
    d.commit_ops(PROVIDER, 8, merkle_root(links), links[-1], bad_proof, now=2)
    assert d.outcome is not None and d.outcome.winner == CHALLENGER


def test_rounds_bound() -> None:
    assert dispute.rounds_bound(10, 500) == 13
    assert dispute.rounds_bound(1, 1) == 0
    assert dispute.rounds_bound(100_000, 10_000) == 17 + 14
