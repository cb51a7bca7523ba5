"""Penalties, logit_bias and logprobs together with structured outputs: the commitment's
optional header sections in every combination, and the per-position order adjust → mask →
draw (logprobs after the mask), the same on the provider's and the verifier's side."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from idlegrid.core import grammar as g
from idlegrid.core.trust import adjust as adj
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import logprobs as lpm
from idlegrid.core.trust import peek, sampling
from idlegrid.core.trust.extras import Extras
from idlegrid.core.trust.report_codec import decode_report, encode_report
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.commit import Recorder, build_commitment, recompute
from idlegrid.engines.steps import Steps, extras_of
from idlegrid.errors import InvalidRequest

MODEL, CLASS = "m", "e/1/f32/cpu/t1"
CON = cm.Constraint(bytes(range(32)), "llguidance/1.9.1")
EXTRAS = Extras(adj.make(0.5, -1.0, {"12": -100, "3": 2.5}), n_prior=2, top_logprobs=2)


def bitmask_of(ok: np.ndarray) -> np.ndarray:
    """The grammar engine's layout: int32 words, bit t % 32 of word t // 32 = token t."""
    bits = np.zeros(((len(ok) + 31) // 32) * 32, dtype=np.uint8)
    bits[: len(ok)] = ok
    return np.packbits(bits, bitorder="little").view(np.int32)


def _commit(extras: Extras | None, constraint: cm.Constraint | None) -> cm.Commitment:
    tokens = [5, 6, 7]
    lps = [lpm.TokenLogprobs(t, -0.5 * t, ((t, -0.5 * t), (3, -9999.0))) for t in tokens]
    entries = [(list(range(6)), [0.5, -0.25, 0.125, 1.0, 2.0, -3.0])]  # k_for(3 tokens) = 6
    return cm.build(
        MODEL, CLASS, [1, 2, 3], 9, 0.5, 0.75, tokens, entries, "length", False, 4,
        extras=extras, logprobs=lps if extras is not None else (), constraint=constraint,
    )  # fmt: skip


# SHA-256 of `_commit(None, None).encode()` as the code before extras and constraints
# (2fbe5e5) wrote it: a plain answer's encoding must not change.
PLAIN_SHA256 = "36f3725f068106811f1f04e0dc1dbcae7d523ca2d5e0464ae59beadc8e7a7d40"


@pytest.mark.parametrize(
    ("extras", "constraint", "version"),
    [(None, None, 1), (None, CON, 1), (EXTRAS, None, 2), (EXTRAS, CON, 2)],
    ids=["plain", "grammar", "extras", "both"],
)
def test_every_combination_round_trips(
    extras: Extras | None, constraint: cm.Constraint | None, version: int
) -> None:
    c = _commit(extras, constraint)
    blob = c.encode()
    back = cm.decode(blob)
    assert back == c
    assert back.header.version == version and blob[2 + len(CLASS) + 2] == version
    assert back.header.extras == (extras or Extras())
    assert back.header.constraint == constraint
    assert peek.peek_constrained(blob) == (constraint is not None)
    assert [lp for ch in back.chunks for lp in ch.logprobs] == (
        [lp for ch in c.chunks for lp in ch.logprobs] if extras else []
    )
    if extras is None and constraint is None:
        assert hashlib.sha256(blob).hexdigest() == PLAIN_SHA256
    # Sections in order: the fixed part and model id, extras (version 2), the constraint.
    head = c.header.encode()
    plain = _commit(None, None).header.encode()
    fixed = cm.HEAD.size  # then the root (covers the chunks, logprobs included), model id
    assert head[0] == version and head[1:fixed] == plain[1:fixed]
    assert head[fixed + 32 : len(plain)] == plain[fixed + 32 :]
    tail = head[len(plain) :]
    assert tail == (extras.encode() if extras else b"") + (
        constraint.encode() if constraint else b""
    )
    for cut in (1, len(tail) // 2 + 1):
        if len(tail) >= cut:
            with pytest.raises(InvalidRequest):
                cm.decode(blob.replace(head, head[:-cut], 1))


def test_the_sections_bind_the_digest_separately() -> None:
    digests = {_commit(e, k).header.digest() for e in (None, EXTRAS) for k in (None, CON)}
    assert len(digests) == 4


class _Matcher:
    """A stand-in grammar: at step i, token t is allowed iff (t + i) % 3 == 0 or t == 7."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.i = vocab, 0

    def ok(self) -> np.ndarray:
        ids = np.arange(self.vocab)
        out: np.ndarray = ((ids + self.i) % 3 == 0) | (ids == 7)
        return out

    def mask(self) -> np.ndarray:
        return bitmask_of(self.ok())

    def consume(self, token: int) -> bool:
        good = bool(self.ok()[token])
        self.i += 1
        return good


V, N, SEED = 300, 20, 11
CONTEXT = [1, 2, 3, 4]


def _logits(r: int) -> np.ndarray:
    out: np.ndarray = (np.random.default_rng(100 + r).standard_normal(V) * 3).astype(np.float32)
    return out


def _state(r: int) -> np.ndarray:
    out: np.ndarray = np.random.default_rng(500 + r).standard_normal(6).astype(np.float32)
    return out


class _Engine:
    """Just enough of an engine for engines/commit.recompute's streaming replay."""

    def det_class(self) -> str:
        return CLASS

    def is_end(self, token: int) -> bool:
        return False

    def replay_states(
        self, context_ids: Sequence[int], tokens: Sequence[int], on_logits: Any
    ) -> np.ndarray:
        for r in range(len(tokens)):
            on_logits(r, _logits(r))
        return np.stack([_state(r) for r in range(len(tokens))])


def _pick(z: np.ndarray, seed: int, position: int, p: SamplingParams) -> int:
    return sampling.choose(z, seed, position, p.temperature, p.top_p)


def _provider(params: SamplingParams) -> tuple[cm.Commitment, Steps, list[int]]:
    steps, m, rec = Steps(CONTEXT, params, V), _Matcher(V), Recorder()
    for r in range(N):
        tok = steps.pick(_pick, _logits(r), SEED, len(CONTEXT) + r, m.mask())
        assert m.consume(tok)
        rec.add(tok, _state(r), steps.last)
    c = build_commitment(
        _Engine(), MODEL, CONTEXT, rec, SEED, params.temperature, params.top_p, "length",
        extras=extras_of(params), constraint=CON,
    )  # fmt: skip
    return c, steps, rec.tokens


PARAMS = SamplingParams(
    0.8, 0.95, SEED, adjust=adj.make(0.0, 2.0, {"7": 20}), logprobs=3, n_prior=2
)


def test_adjust_then_mask_then_draw_and_logprobs_after_the_mask() -> None:
    c, _, tokens = _provider(PARAMS)
    check = _Matcher(V)
    committed = [x for ch in c.chunks for x in ch.logprobs]
    for tok, lp in zip(tokens, committed, strict=True):
        ok = check.ok()
        assert ok[tok] and check.consume(tok)
        # Logprobs are the allowed tokens' distribution: the top alternatives are allowed
        # ones and their probabilities (with the sampled token's) come from the mask's
        # renormalised softmax, never from the unconstrained one.
        assert all(ok[t] for t, _ in lp.top) and lp.top[0][1] >= lp.top[-1][1]
        assert all(v > lpm.FLOOR for _, v in lp.top)
        assert lp.token == tok and lp.logprob <= 0 and math.isfinite(lp.logprob)
    # Token 7 is always allowed and biased +20: drawn first, until the frequency penalty
    # (2 per earlier draw) has sunk it below the allowed others.
    assert tokens[0] == 7 and 1 < tokens.count(7) < N // 2, tokens


def test_fewer_allowed_tokens_than_alternatives_are_at_the_floor() -> None:
    ok = np.zeros(50, dtype=bool)
    ok[[4, 9]] = True
    z = g.apply_mask(np.linspace(0, 5, 50).astype(np.float32), bitmask_of(ok))
    lp = lpm.token_logprobs(z, 9, 1.0, 4)
    assert [t for t, _ in lp.top[:2]] == [9, 4]
    assert [v for _, v in lp.top[2:]] == [lpm.FLOOR, lpm.FLOOR]
    assert math.isclose(math.exp(lp.top[0][1]) + math.exp(lp.top[1][1]), 1.0, rel_tol=1e-6)
    assert lpm.faults(lp, lpm.recheck(z, lp, 1.0), 0.0) == []


def test_the_verifier_replays_adjust_mask_and_logprobs_exactly() -> None:
    c, _, _ = _provider(PARAMS)
    c = cm.decode(c.encode())
    assert c.header.version == 2 and c.header.constraint == CON
    report = recompute(_Engine(), CONTEXT, c, N, (), None, _Matcher(V))
    assert all(len(ch.logprobs) == len(cc.tokens) for ch, cc in zip(report.chunks, c.chunks,
                                                                     strict=True))  # fmt: skip
    v = cm.judge(c, decode_report(encode_report(report)), cm.EXACT, N)
    assert v.passed, v.reasons
    # Without the grammar the verifier's logprobs are not the committed (masked) ones.
    bare = cm.judge(c, recompute(_Engine(), CONTEXT, c, N, (), None, None), cm.EXACT, N)
    assert not bare.passed and any("logprobs" in r for r in bare.reasons)


def test_a_provider_that_skips_the_penalty_under_a_grammar_fails() -> None:
    honest, _, _ = _provider(PARAMS)
    skipped, _, _ = _provider(replace(PARAMS, adjust=adj.make(0.0, 0.0, {"7": 20})))
    assert skipped.tokens.count(7) > honest.tokens.count(7)
    # It commits to the request's penalties (the coordinator insists) but drew without them.
    lie = cm.build(
        MODEL, CLASS, CONTEXT, SEED, PARAMS.temperature, PARAMS.top_p, skipped.tokens,
        [(ch.indices, ch.values) for ch in skipped.chunks], "length", False, 6,
        extras=extras_of(PARAMS), logprobs=[x for ch in skipped.chunks for x in ch.logprobs],
        constraint=CON,
    )  # fmt: skip
    v = cm.judge(lie, recompute(_Engine(), CONTEXT, lie, N, (), None, _Matcher(V)), cm.EXACT, N)
    assert not v.passed
