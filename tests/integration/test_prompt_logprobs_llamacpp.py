"""Prompt logprobs (completions `echo` with `logprobs`) on the default engine: the provider
scores the prompt in a pass of its own, commits the values, and a verifier recomputes them.
Honest answers pass exactly; invented prompt scores and relabelled positions fail; through
the official `openai` client on a loopback grid, echoed prompts carry the engine's own
values, whole and streamed, and their audits pass."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from idlegrid.agent.serving import score_prompt
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust.report_codec import decode_report, encode_report
from idlegrid.engines.base import Generation, SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.engines.steps import extras_of
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import provider_and_verifier, wait_until

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

CONTEXT = 256
SAME = cm.Tolerance(rel=0.0, rank_slack=0.0, margin=0.0, logprob=0.0)  # same engine: exact
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    yield e
    e.close()


def _commit(provider: LlamaCppEngine, k: int = 2, n: int = 6) -> cm.Commitment:
    ids = provider.tokenize(PROMPT)
    params = SamplingParams(0.7, 1.0, 9, logprobs=k)
    rec, res = Recorder(), Generation()
    rec.prompt = score_prompt(provider, ids, k)
    provider.recorder = rec
    try:
        for _ in stream_pieces(provider, ids, params, max_tokens=n, result=res):
            pass
        c = build_commitment(
            provider, DEFAULT_MODEL, ids, rec, 9, 0.7, 1.0, res.finish_reason,
            extras=extras_of(params),
        )  # fmt: skip
    finally:
        provider.recorder = None
    return cm.decode(c.encode())


def _judge(c: cm.Commitment, verifier: LlamaCppEngine) -> cm.Verdict:
    ids = verifier.tokenize(PROMPT)
    report = decode_report(encode_report(verifier.audit(ids, c, 6)))
    return cm.judge(c, report, SAME, 6)


def test_prompt_logprobs_are_committed_and_an_honest_answer_passes(engine) -> None:
    c = _commit(engine)
    ids = engine.tokenize(PROMPT)
    assert c.prompt is not None and c.header.prompt_digest == c.prompt.digest()
    assert [r.token for r in c.prompt.rows] == ids[1:]
    assert all(len(r.top) == 2 and r.logprob <= 0 for r in c.prompt.rows)
    # " Paris" after "...France is" is likelier than " Italy" after "The capital of".
    paris, italy = (ids.index(engine.tokenize(w, add_bos=False)[0]) for w in (" Paris", " Italy"))
    assert c.prompt.rows[paris - 1].logprob > c.prompt.rows[italy - 1].logprob
    verdict = _judge(c, engine)
    assert verdict.passed, verdict.reasons


def test_invented_prompt_scores_fail_their_audit(engine) -> None:
    liar = cheats.LlamaPromptInventing(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    try:
        c = _commit(liar)
    finally:
        liar.close()
    verdict = _judge(c, engine)
    assert not verdict.passed
    assert any(r.startswith("prompt: reported logprobs") for r in verdict.reasons), verdict
    assert verdict.worst_rel == 0.0  # the answer itself is honest: only the lie shows


def test_relabelled_prompt_positions_fail_their_audit(engine) -> None:
    """Honest values, but two positions swapped: each value now names the wrong token."""
    c = _commit(engine)
    assert c.prompt is not None
    rows = list(c.prompt.rows)
    rows[2], rows[3] = replace(rows[3], token=rows[2].token), replace(rows[2], token=rows[3].token)
    prompt = replace(c.prompt, rows=tuple(rows))
    header = replace(c.header, prompt_digest=prompt.digest())
    verdict = _judge(cm.Commitment(header, c.chunks, prompt), engine)
    assert any(r.startswith("prompt: reported logprobs") for r in verdict.reasons), verdict


def test_echo_with_logprobs_through_the_openai_client_is_the_engines_and_audited(
    tmp_path: Path, engine
) -> None:
    verifier = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    with provider_and_verifier(tmp_path, engine, verifier) as (coord, http, key, client):
        kw = dict(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
        plain = client.completions.create(**kw)
        whole = client.completions.create(**kw, echo=True)
        chunks = [c for c in client.completions.create(**kw, echo=True, stream=True) if c.choices]
        # The scoring request (lm-eval's): the prompt's logprobs alone, committed and audited.
        scoring = client.completions.create(**{**kw, "max_tokens": 0}, echo=True)

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        wait_until(lambda: len(audits()) >= 4 and all(a["state"] in ("passed", "failed")
                                                 for a in audits()), 120)  # fmt: skip
        assert all(a["state"] == "passed" for a in audits()), [a["verdict"] for a in audits()]
    ids = engine.tokenize(PROMPT)
    want = score_prompt(engine, ids, 2)
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    n = len(ids)
    assert whole.usage is not None and plain.usage is not None
    assert whole.usage.prompt_tokens == plain.usage.prompt_tokens == n  # the echo is not billed
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:n] == [r.logprob for r in want.rows]
    assert whole.choices[0].text == PROMPT + plain.choices[0].text
    assert "".join(lp.tokens) == whole.choices[0].text
    assert plain.choices[0].logprobs is not None
    assert lp.token_logprobs[n:] == plain.choices[0].logprobs.token_logprobs
    # Streamed: the prompt first, in a chunk of its own, with the same values.
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs is not None
    assert first.logprobs.token_logprobs == lp.token_logprobs[:n]
    assert scoring.choices[0].text == PROMPT and scoring.usage is not None
    assert scoring.usage.completion_tokens == 0 and scoring.usage.prompt_tokens == n
    assert scoring.choices[0].logprobs is not None
    assert scoring.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]
