"""Penalties, logit_bias and logprobs maths, and their place in commitments (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from idlegrid.core.trust import adjust as adj
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust import sampling
from idlegrid.core.trust.extras import Extras
from idlegrid.core.trust.report_codec import decode_report, encode_report


def test_openai_definition_of_penalties_and_bias() -> None:
    logits = np.zeros(6, dtype=np.float32)
    a = adj.make(presence=0.5, frequency=0.25, bias={"4": 3.0, 5: -100})
    out = adj.adjust_logits(logits, {1: 1, 2: 3}, a)
    # token 1: -(0.5 + 0.25*1); token 2: -(0.5 + 0.25*3); 4: +3; 5: -100; others untouched
    assert out.tolist() == [0.0, -0.75, -1.25, 0.0, 3.0, -100.0]
    assert logits.tolist() == [0.0] * 6  # the input is not modified


def test_neutral_adjust_is_the_identity_without_a_copy() -> None:
    logits = np.arange(5, dtype=np.float32)
    assert adj.adjust_logits(logits, {1: 4}, adj.make()) is logits
    assert adj.make().neutral and not adj.make(bias={"1": 0.5}).neutral


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence": 2.5}, "presence_penalty"),
        ({"frequency": -2.01}, "frequency_penalty"),
        ({"bias": {"7": 100.5}}, "logit_bias"),
        ({"bias": {"-1": 1}}, "logit_bias"),
        ({"bias": {"x": 1}}, "logit_bias"),
        ({"bias": {"1": True}}, "logit_bias"),
        ({"bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ],
)
def test_out_of_range_values_name_their_field(kwargs: dict, param: str) -> None:
    with pytest.raises(adj.AdjustError) as info:
        adj.make(**kwargs)
    assert info.value.param == param


def test_bias_ids_are_checked_against_the_vocabulary() -> None:
    a = adj.make(bias={"9": 1})
    adj.check_vocab(a, 10)
    with pytest.raises(adj.AdjustError, match="vocabulary"):
        adj.check_vocab(a, 9)


def test_minus_100_bans_and_plus_100_forces_even_greedy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 5000).astype(np.float32)
    best = int(np.argmax(logits))
    banned = adj.adjust_logits(logits, {}, adj.make(bias={best: -100}))
    for pos in range(50):
        assert sampling.choose(banned, 7, pos, 1.0) != best
    assert sampling.choose(banned, 7, 0, 0.0) != best
    forced = adj.adjust_logits(logits, {}, adj.make(bias={3: 100}))
    assert all(sampling.choose(forced, 7, pos, 1.0, 0.9) == 3 for pos in range(20))


def test_frequency_penalty_lowers_repeats_in_a_seeded_draw() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, 50).astype(np.float32)
    logits[:3] += 4  # three favourites

    def run(freq: float) -> int:
        a, counts, out = adj.make(frequency=freq), {}, []
        for pos in range(60):
            t = sampling.choose(adj.adjust_logits(logits, counts, a), 5, pos, 1.0)
            adj.count(counts, t)
            out.append(t)
        return len(out) - len(set(out))

    assert run(2.0) < run(0.0)


def test_logprobs_are_the_adjusted_tempered_log_softmax() -> None:
    z = np.array([2.0, 1.0, 0.0, 1.0], dtype=np.float32)
    lp = lpm.token_logprobs(z, 1, 0.5, 3)
    want = z / 0.5 - np.log(np.exp(z / 0.5).sum())
    assert lp.token == 1 and lp.logprob == pytest.approx(want[1], abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 3]  # ties to the lower id
    assert lp.top[0][1] == pytest.approx(want[0], abs=1e-6)
    greedy = lpm.token_logprobs(z, 0, 0.0, 0)  # T = 0 reports the T = 1 distribution
    assert greedy.logprob == pytest.approx(float(z[0] - np.log(np.exp(z).sum())), abs=1e-6)
    assert greedy.top == ()


def test_top_ids_match_a_full_sort_on_a_large_vocabulary() -> None:
    z = np.random.default_rng(2).normal(0, 4, 262_144)
    for k in (1, 5, 20):
        assert lpm.top_ids(z, k).tolist() == np.argsort(-z, kind="stable")[:k].tolist()
    flat = np.zeros(100)
    assert lpm.top_ids(flat, 3).tolist() == [0, 1, 2]


def test_recheck_accepts_honest_and_refuses_invented_logprobs() -> None:
    z = np.random.default_rng(3).normal(0, 2, 1000)
    honest = lpm.token_logprobs(z, 17, 0.8, 5)
    rc = lpm.recheck(z + 1e-5, honest, 0.8)  # a verifier's slightly different logits
    assert lpm.faults(honest, rc, 1e-3) == []
    invented = lpm.TokenLogprobs(17, -0.01, honest.top)
    assert "reported logprobs are not the model's" in lpm.faults(invented, rc, 1e-3)
    wrong_top = lpm.TokenLogprobs(17, honest.logprob, ((17, honest.logprob), *honest.top[1:]))
    if 17 not in [t for t, _ in honest.top]:
        bad = lpm.faults(wrong_top, lpm.recheck(z, wrong_top, 0.8), 1e-3)
        assert "reported top_logprobs are not the most likely tokens" in bad


def _commit(extras: Extras, lps: list[lpm.TokenLogprobs]) -> cm.Commitment:
    tokens = [lp.token for lp in lps] or [5, 6, 7]
    entries = [(list(range(6)), [0.5, -0.25, 0.125, 1.0, 2.0, -3.0])]
    return cm.build("m", "fake/1/bytes/cpu/t1", [1, 2, 3], 9, 0.5, 0.75, tokens, entries,
                    "length", False, 8, extras=extras, logprobs=lps)  # fmt: skip


def test_neutral_extras_keep_the_version_1_encoding() -> None:
    plain = _commit(Extras(), [])
    assert plain.encode()[2 + len(b"fake/1/bytes/cpu/t1") + 2] == 1  # the version byte
    assert cm.decode(plain.encode()) == plain


def test_extras_and_logprobs_round_trip_and_bind_the_digest() -> None:
    lps = [lpm.TokenLogprobs(t, -0.5 * t, ((t, -0.5 * t), (3, -2.0))) for t in (5, 6, 7)]
    ex = Extras(adj.make(0.5, -1.0, {"12": -100, "3": 2.5}), n_prior=4, top_logprobs=2)
    c = _commit(ex, lps)
    back = cm.decode(c.encode())
    assert back == c and back.header.extras == ex
    assert [lp for ch in back.chunks for lp in ch.logprobs] == lps
    other = _commit(Extras(adj.make(0.5, -1.0, {"12": -99}), 4, 2), lps)
    assert other.header.digest() != c.header.digest()
    lied = _commit(ex, [lps[0], lpm.TokenLogprobs(6, -0.1, lps[1].top), lps[2]])
    assert lied.header.root != c.header.root  # logprobs are in the Merkle leaves


def test_judge_checks_committed_logprobs() -> None:
    z = np.random.default_rng(4).normal(0, 2, 64)
    lps = [lpm.token_logprobs(z, t, 1.0, 2) for t in (5, 6, 7)]
    c = _commit(Extras(top_logprobs=2), lps)
    chunk = c.chunks[0]

    def report(rechecks: tuple[lpm.Recheck, ...]) -> cm.Report:
        rc = cm.ChunkReport(chunk.values, 0.125, (0.0,) * 3, (True,) * 3, rechecks)
        return cm.Report(c.header.context_hash, (rc,), True, "x", 3)

    good = tuple(lpm.recheck(z, lp, 1.0) for lp in lps)
    assert cm.judge(c, report(good), cm.EXACT, 3).passed
    back = decode_report(encode_report(report(good)))
    assert back.chunks[0].logprobs == good
    shifted = tuple(lpm.recheck(z + 0.5 * (np.arange(64) == 6), lp, 1.0) for lp in lps)
    v = cm.judge(c, report(shifted), cm.Tolerance(0, 0, 0, logprob=1e-2), 3)
    assert not v.passed and any("logprobs are not the model's" in r for r in v.reasons)
    missing = cm.judge(c, report(()), cm.EXACT, 3)
    assert not missing.passed


def test_header_faults_compare_with_the_request() -> None:
    want = adj.make(0.5, 0, {"3": 1})
    assert adj.header_faults(0.5, 0.0, ((3, 1.0),), want) == []
    assert adj.header_faults(0.0, 0.0, (), want)
    assert math.isclose(adj.f32(0.1), 0.1, rel_tol=1e-7)
