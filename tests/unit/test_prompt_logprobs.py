"""Prompt logprobs (echo with logprobs) in the commitment and the report, without a model:
the section round-trips, the header binds it, and the judge catches wrong values, wrong
positions and a report that leaves them out."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import prompt_lp
from idlegrid.core.trust.extras import Extras
from idlegrid.core.trust.logprobs import TokenLogprobs
from idlegrid.core.trust.report_codec import decode_report, encode_report
from idlegrid.errors import InvalidRequest

VOCAB = 50
PROMPT = [1, 7, 3, 9, 4]
VALUES = [0.75, 0.5, -0.25, 0.125]  # a 2-token chunk keeps 4 entries (k_for)


def _logits(p: int) -> np.ndarray:
    return np.random.default_rng(p).normal(size=VOCAB).astype(np.float32)


def _scored(k: int = 2) -> prompt_lp.PromptLogprobs:
    return prompt_lp.PromptLogprobs(
        k, tuple(prompt_lp.score(_logits(p), PROMPT[p + 1], k) for p in range(len(PROMPT) - 1))
    )


def _commitment(prompt: prompt_lp.PromptLogprobs | None, extras: Extras | None = None):
    entries = [([0, 1, 2, 3], VALUES)]
    return cm.build(
        "m", "fake/1/bytes/cpu/t1", PROMPT, 5, 0.0, 1.0, [11, 12], entries, "length", False, 4,
        extras=extras, prompt=prompt,
    )  # fmt: skip


def _report(c: cm.Commitment, rechecks: tuple) -> cm.Report:
    chunk = cm.ChunkReport(tuple(VALUES), 0.125, (0.0, 0.0), (True, True))
    return cm.Report(cm.context_hash(PROMPT), (chunk,), True, c.header.det_class, 5, rechecks)


def _honest(scored: prompt_lp.PromptLogprobs) -> tuple:
    return tuple(
        prompt_lp.recheck_at(_logits(p), row, PROMPT[p + 1]) for p, row in enumerate(scored.rows)
    )


def test_the_section_round_trips_and_the_header_binds_it() -> None:
    scored = _scored()
    c = _commitment(scored)
    back = cm.decode(c.encode())
    assert back.prompt == scored and back.header.version == c.header.version == 9
    assert back.header.prompt_digest == scored.digest()
    assert cm.decode(_commitment(None).encode()).prompt is None  # version 1, unchanged
    # Another value under the same header: the digest no longer matches.
    bent = dataclasses.replace(scored.rows[0], logprob=scored.rows[0].logprob - 1.0)
    forged = cm.Commitment(
        c.header, c.chunks, dataclasses.replace(scored, rows=(bent, *scored.rows[1:]))
    )
    with pytest.raises(InvalidRequest, match="prompt logprobs do not match"):
        cm.decode(forged.encode())


def test_with_answer_logprobs_too_both_sections_decode() -> None:
    extras = Extras(top_logprobs=1)
    lps = [TokenLogprobs(11, -0.5, ((11, -0.5),)), TokenLogprobs(12, -0.25, ((12, -0.25),))]
    entries = [([0, 1, 2, 3], VALUES)]
    c = cm.build(
        "m", "fake/1/bytes/cpu/t1", PROMPT, 5, 0.0, 1.0, [11, 12], entries, "length", False, 4,
        extras=extras, logprobs=lps, prompt=_scored(),
    )  # fmt: skip
    back = cm.decode(c.encode())
    assert back.header.version == 10 and back.prompt == _scored()
    assert list(back.chunks[0].logprobs) == lps


def test_an_honest_recomputation_passes_and_survives_the_wire() -> None:
    scored = _scored()
    c = _commitment(scored)
    report = decode_report(encode_report(_report(c, _honest(scored))))
    assert report.prompt == _honest(scored)
    assert not prompt_lp.faults(c.prompt, report.prompt, 0.0)
    assert cm.judge(c, report, cm.EXACT, 4).passed


def test_wrong_values_wrong_positions_and_missing_rechecks_fail() -> None:
    scored = _scored()
    c = _commitment(scored)
    rows = list(scored.rows)
    rows[1] = dataclasses.replace(rows[1], logprob=-0.001)  # "near certain"
    invented = dataclasses.replace(scored, rows=tuple(rows))
    assert prompt_lp.faults(invented, _honest(scored), 1e-2) == [
        "prompt: reported logprobs are not the model's"
    ]
    swapped = list(scored.rows)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    relabel = tuple(
        prompt_lp.recheck_at(_logits(p), row, PROMPT[p + 1]) for p, row in enumerate(swapped)
    )
    assert prompt_lp.faults(dataclasses.replace(scored, rows=tuple(swapped)), relabel, 1e-2)
    verdict = cm.judge(c, _report(c, ()), cm.EXACT, 4)
    assert "prompt: " not in " ".join(verdict.reasons)  # the shape fault, named as such
    assert "report covers other prompt positions than the commitment" in verdict.reasons
    assert prompt_lp.faults(None, _honest(scored), 0.0)  # rechecks nobody asked for


def test_a_malformed_section_is_a_400() -> None:
    blob = _commitment(_scored()).encode()
    with pytest.raises(InvalidRequest):
        cm.decode(blob[:-3])
    with pytest.raises(InvalidRequest):
        cm.decode(blob + b"\x00")
