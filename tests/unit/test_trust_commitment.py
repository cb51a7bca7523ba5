"""Commitment encoding, the verdict on a recomputation, and replayable seeded sampling."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import sampling
from idlegrid.errors import InvalidRequest

TOL = cm.Tolerance(rel=1e-3, rank_slack=1e-3, margin=1e-3)


def _states(n: int, hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, hidden)).astype(np.float32)


def _topk(rows: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    flat = rows.reshape(-1)
    idx = np.argsort(-np.abs(flat), kind="stable")[:k]
    return [int(i) for i in idx], [float(flat[i]) for i in idx]


def _commit(tokens: list[int], states: np.ndarray, **kw) -> cm.Commitment:
    entries = []
    for j in range(0, len(tokens), cm.CHUNK_SIZE):
        rows = states[j : j + cm.CHUNK_SIZE]
        entries.append(_topk(rows, cm.k_for(len(rows))))
    args = dict(
        model="tiny",
        det_class="torch/float32/t1",
        context_ids=[2, 5, 6],
        seed=7,
        temperature=0.0,
        top_p=1.0,
        tokens=tokens,
        entries=entries,
        finish_reason="length",
        ended_by_end_token=False,
        hidden=states.shape[1],
    )
    args.update(kw)
    return cm.build(**args)


def _report(c: cm.Commitment, states: np.ndarray, context=(2, 5, 6), end_ok=True) -> cm.Report:
    chunks = []
    for j, ch in enumerate(c.chunks):
        rows = states[j * cm.CHUNK_SIZE : j * cm.CHUNK_SIZE + len(ch.tokens)].reshape(-1)
        kth = float(np.sort(np.abs(rows))[::-1][len(ch.indices) - 1])
        chunks.append(
            cm.ChunkReport(
                tuple(float(rows[i]) for i in ch.indices),
                kth,
                (0.5,) * len(ch.tokens),
                (True,) * len(ch.tokens),
            )
        )
    return cm.Report(cm.context_hash(list(context)), tuple(chunks), end_ok)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(4, 48))
def test_round_trip_and_size_per_token(n, hidden) -> None:
    tokens = list(range(n))
    c = _commit(tokens, _states(n, hidden))
    back = cm.decode(c.encode())
    assert back == c
    assert back.header.digest() == c.header.digest()
    assert back.tokens == tokens
    # 4 B per token id + 8 B per entry (2 entries per token) + 4 B per chunk.
    per_token = c.fingerprint_bytes() / n
    assert per_token <= 4 + 8 * cm.TOP_K / cm.CHUNK_SIZE + 4 + 8


def test_full_proof_fits_32_bytes_per_token_from_32_tokens() -> None:
    c = _commit(list(range(64)), _states(64, 640))
    assert len(c.encode()) / 64 <= 32
    assert c.fingerprint_bytes() / 64 == pytest.approx(20.25)


def test_honest_recomputation_passes_exactly() -> None:
    states = _states(40, 16)
    c = _commit(list(range(40)), states)
    v = cm.judge(c, _report(c, states), cm.EXACT, max_new_tokens=40)
    assert v.passed, v.reasons
    assert v.worst_rel == 0.0


def test_small_noise_passes_tolerance_but_not_exact_and_large_noise_fails() -> None:
    states = _states(40, 16)
    c = _commit(list(range(40)), states)
    noisy = states * (1 + 1e-5 * _states(40, 16, seed=1))
    assert cm.judge(c, _report(c, noisy), TOL, 40).passed
    assert not cm.judge(c, _report(c, noisy), cm.EXACT, 40).passed
    wrong = states + 0.05 * _states(40, 16, seed=2)
    v = cm.judge(c, _report(c, wrong), TOL, 40)
    assert not v.passed and v.first_bad_chunk == 0


def test_other_prompt_bad_finish_too_many_tokens_and_bad_sampling_fail() -> None:
    states = _states(20, 16)
    c = _commit(list(range(20)), states)
    assert not cm.judge(c, _report(c, states, context=(2, 5, 7)), TOL, 20).passed
    assert not cm.judge(c, _report(c, states, end_ok=False), TOL, 20).passed
    assert not cm.judge(c, _report(c, states), TOL, 10).passed
    rep = _report(c, states)
    bad = dataclasses.replace(rep.chunks[1], margins=(0.5,) * 3 + (-0.2,))
    v = cm.judge(c, dataclasses.replace(rep, chunks=(rep.chunks[0], bad)), TOL, 20)
    assert not v.passed and v.first_bad_chunk == 1
    outside = dataclasses.replace(rep.chunks[0], allowed=(False,) + (True,) * 15)
    rep2 = dataclasses.replace(rep, chunks=(outside, rep.chunks[1]))
    assert not cm.judge(c, rep2, TOL, 20).passed


def test_cherry_picked_small_entries_fail_the_rank_check() -> None:
    states = _states(16, 16)
    flat = states.reshape(-1)
    idx = [int(i) for i in np.argsort(np.abs(flat))[: cm.TOP_K]]  # the smallest, not the largest
    c = cm.build(
        "tiny",
        "c",
        [2],
        1,
        0.0,
        1.0,
        list(range(16)),
        [(idx, [float(flat[i]) for i in idx])],
        "length",
        False,
        16,
    )
    rep = _report(c, states, context=(2,))
    assert not cm.judge(c, rep, TOL, 16).passed


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:-1],
        lambda b: b + b"\x00",
        lambda b: b[:10],
        lambda b: b"",
        lambda b: b[:-4] + struct.pack("<f", float("nan")),
        lambda b: b[:-200] + bytes(200),
    ],
)
def test_malformed_commitments_are_invalid_requests(mutate) -> None:
    c = _commit(list(range(20)), _states(20, 16))
    with pytest.raises(InvalidRequest):
        cm.decode(mutate(c.encode()))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(blob) -> None:
    with contextlib.suppress(InvalidRequest):
        cm.decode(blob)


def test_gumbel_noise_is_a_pure_function_and_roughly_gumbel() -> None:
    ids = np.arange(50_000)
    g1 = sampling.gumbel(42, 9, ids)
    assert np.array_equal(g1, sampling.gumbel(42, 9, ids))
    assert np.array_equal(g1[[7, 3]], sampling.gumbel(42, 9, np.array([7, 3])))
    assert not np.array_equal(g1, sampling.gumbel(42, 10, ids))
    assert abs(g1.mean() - 0.5772) < 0.02  # Euler–Mascheroni
    assert abs(g1.std() - 1.2825) < 0.02


def test_seeded_sampling_follows_the_softmax_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    counts = np.bincount([sampling.choose(logits, 3, pos, 1.0) for pos in range(8000)], minlength=4)
    assert np.allclose(counts / 8000, [0.5, 0.3, 0.15, 0.05], atol=0.02)


def test_top_p_restricts_to_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = {sampling.choose(logits, 3, pos, 1.0, top_p=0.7) for pos in range(2000)}
    assert picks == {0, 1}


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 4000), st.floats(0.3, 2.0), st.floats(0.5, 1.0))
def test_the_chosen_token_replays_with_a_non_negative_margin(seed, pos, temp, top_p) -> None:
    logits = np.random.default_rng(seed % 1000).standard_normal(300).astype(np.float32) * 3
    tok = sampling.choose(logits, seed, pos, temp, top_p)
    r = sampling.replay(logits, tok, seed, pos, temp, top_p)
    assert r.allowed and r.margin >= 0
    others = [t for t in range(300) if t != tok][:20]
    worse = [sampling.replay(logits, t, seed, pos, temp, top_p) for t in others]
    assert all((not w.allowed) or w.margin <= 0 for w in worse)


def test_greedy_replay_and_an_out_of_range_token() -> None:
    logits = np.array([0.1, 2.0, 1.9], dtype=np.float32)
    assert sampling.choose(logits, 1, 1, 0.0) == 1
    assert sampling.replay(logits, 1, 1, 1, 0.0).margin == pytest.approx(0.1, abs=1e-6)
    assert sampling.replay(logits, 2, 1, 1, 0.0).margin < 0
    assert sampling.replay(logits, 99, 1, 1, 0.0).allowed is False


def test_top_p_zero_is_greedy_and_replays() -> None:
    logits = np.log(np.array([0.2, 0.5, 0.3]))
    assert {sampling.choose(logits, 1, pos, 1.0, top_p=0.0) for pos in range(50)} == {1}
    assert sampling.replay(logits, 1, 1, 3, 1.0, top_p=0.0).allowed
    assert not sampling.replay(logits, 2, 1, 3, 1.0, top_p=0.0).allowed
