"""Issue 15: no credit for work that was not committed and could not be checked. The pure
rules (what an attempt is paid for, which prompt count is billed), the report's context
length, and the fake engine's commitments checked through the same path as llama.cpp's."""

from __future__ import annotations

import dataclasses

import pytest

from idlegrid.core import tasks
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import dispute
from idlegrid.core.trust.report_codec import decode_report, encode_report
from idlegrid.engines.base import SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.fake import END_MARKER, FakeEngine

TOL = cm.Tolerance(rel=2e-5, rank_slack=2e-5, margin=1e-3)


def test_uncommitted_output_is_never_payable() -> None:
    assert tasks.payable_tokens(12, committed=True) == 12
    assert tasks.payable_tokens(12, committed=False) == 0
    assert tasks.payable_tokens(0, committed=True) == 0


def test_prompt_tokens_are_billed_from_the_commitment_not_the_claim() -> None:
    honest = tasks.billed_prompt_tokens(40, 0, claimed=40, max_prompt_tokens=100)
    assert (honest.tokens, honest.disagrees) == (40, False)
    inflated = tasks.billed_prompt_tokens(40, 0, claimed=152, max_prompt_tokens=500)
    assert (inflated.tokens, inflated.disagrees) == (40, True)
    # After failover the context holds earlier attempts' tokens: they are not prompt.
    assert tasks.billed_prompt_tokens(40 + 7, 7, claimed=47, max_prompt_tokens=100).tokens == 40
    # Never above what the request could hold (the escrow's basis), never negative.
    assert tasks.billed_prompt_tokens(400, 0, claimed=400, max_prompt_tokens=100).tokens == 100
    assert tasks.billed_prompt_tokens(3, 7, claimed=0, max_prompt_tokens=100).tokens == 0


def test_the_uncommitted_outcome_is_not_blameless() -> None:
    from idlegrid.coordinator.market.store import _BLAMELESS

    assert tasks.UNCOMMITTED not in _BLAMELESS


def _serve(
    engine: FakeEngine, prompt: str, params: SamplingParams, max_tokens: int
) -> tuple[list[int], cm.Commitment]:
    ids = engine.tokenize(prompt)
    rec = Recorder()
    engine.recorder = rec
    from idlegrid.engines.base import Generation

    result = Generation()
    try:
        list(stream_pieces(engine, ids, params, max_tokens=max_tokens, result=result))
    finally:
        engine.recorder = None
    c = build_commitment(
        engine, "fake", ids, rec, params.seed or 0, params.temperature, params.top_p,
        result.finish_reason,
    )  # fmt: skip
    return ids, c


@pytest.mark.parametrize(
    ("prompt", "params", "max_tokens"),
    [
        ("hello", SamplingParams(0.0), 40),
        ("hello", SamplingParams(0.8, 0.9, seed=7), 40),
        (f"say {END_MARKER} then stop", SamplingParams(0.7, seed=3), 200),
    ],
)
def test_an_honest_fake_commits_and_a_fake_verifier_passes_it_bit_exact(
    prompt: str, params: SamplingParams, max_tokens: int
) -> None:
    ids, c = _serve(FakeEngine(), prompt, params, max_tokens)
    assert c.header.n_tokens >= 1 and c.header.start == len(ids)
    assert c.header.det_class == "fake/1/bytes/cpu/t1"
    c = cm.decode(c.encode())  # the wire form the coordinator stores
    report = FakeEngine().audit(ids, c, max_tokens)
    assert report.context_len == len(ids)
    verdict = cm.judge(c, decode_report(encode_report(report)), cm.EXACT, max_tokens)
    assert verdict.passed, verdict.reasons
    assert verdict.worst_rel == 0.0


def test_a_fake_that_lies_fails_its_audit() -> None:
    params = SamplingParams(0.8, seed=11)
    ids, c = _serve(FakeEngine(), "prompt", params, 32)
    verifier = FakeEngine()
    # Another seed: other hidden states and other tokens.
    replayed = dataclasses.replace(c, header=dataclasses.replace(c.header, seed=12))
    assert not cm.judge(replayed, verifier.audit(ids, replayed, 32), TOL, 32).passed
    # An answer for another prompt.
    other_ids, other = _serve(FakeEngine(), "other prompt", params, 32)
    verdict = cm.judge(other, verifier.audit(ids, other, 32), TOL, 32)
    assert not verdict.passed and "context hash" in verdict.reasons[0]
    # Invented tokens with honest-looking states of them.
    toks = c.tokens
    bad_tokens = [t if i != 5 else (t + 1 if t < 200 else t - 1) for i, t in enumerate(toks)]
    rec = Recorder()
    for t in bad_tokens:
        rec.add(t, [t / 256.0] + [0.5] * 7)  # type: ignore[arg-type]
    forged = build_commitment(verifier, "fake", ids, rec, 11, 0.8, 1.0, c.header.finish_reason)
    assert not cm.judge(forged, verifier.audit(ids, forged, 32), TOL, 32).passed


def test_a_commitment_whose_start_overstates_the_context_fails_the_audit() -> None:
    """The header's start is what billing reads: a verifier that recomputed the context
    from what the coordinator sent refutes an inflated one, in the audit and in a dispute."""
    ids, c = _serve(FakeEngine(), "count me", SamplingParams(0.0), 16)
    inflated = dataclasses.replace(c, header=dataclasses.replace(c.header, start=4 * len(ids)))
    report = FakeEngine().audit(ids, inflated, 16)
    verdict = cm.judge(inflated, report, TOL, 16)
    assert not verdict.passed
    assert any("commitment says" in r for r in verdict.reasons)
    # The dispute's one-position check reads the same fact.
    answer = dispute.only_position(report, 0, len(inflated.chunks))
    assert dispute.faults_at(inflated, 0, answer, TOL)
    assert not dispute.faults_at(c, 0, dispute.only_position(report, 0, len(c.chunks)), TOL)


def test_reports_without_a_context_length_still_decode() -> None:
    ids, c = _serve(FakeEngine(), "old verifier", SamplingParams(0.0), 8)
    report = FakeEngine().audit(ids, c, 8)
    blob = encode_report(report)
    old = decode_report(blob[:-4])  # a verifier from before the length was sent
    assert old.context_len == -1 and cm.judge(c, old, TOL, 8).passed
    with pytest.raises(Exception, match="malformed"):
        decode_report(blob + b"\x00")
