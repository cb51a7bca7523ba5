"""Penalties, logit_bias and logprobs on the default engine (llama.cpp, gemma3:270m).

Pure engine level: a penalised, biased answer with logprobs is committed and audited and
passes (exactly, on the same engine); the penalty-skipping and logprob-inventing cheats
fail. Then a real loopback grid through the official `openai` package: frequency_penalty
reduces repeats on the same seed, a bias of -100 bans a token, logprobs are the engine's
own distribution, streamed and whole, and every answer's audit passes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from idlegrid.core import grammar
from idlegrid.core.trust import adjust as adj
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import logprobs as lpm
from idlegrid.engines.base import Generation, SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.engines.steps import extras_of
from idlegrid.testbed import cheats
from idlegrid.testbed.inprocess import provider_and_verifier

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

CONTEXT = 256
SAME = cm.Tolerance(rel=0.0, rank_slack=0.0, margin=0.0, logprob=0.0)  # same engine: exact
PROMPT = "List the days of the week: Monday, Tuesday,"


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    yield e
    e.close()


def _serve_and_audit(
    provider: LlamaCppEngine, verifier: LlamaCppEngine, params: SamplingParams, n: int = 16
) -> tuple[Generation, cm.Commitment, cm.Verdict]:
    ids = provider.tokenize(PROMPT)
    rec, res = Recorder(), Generation()
    provider.recorder = rec
    try:
        for _ in stream_pieces(provider, ids, params, max_tokens=n, result=res):
            pass
        c = build_commitment(
            provider, DEFAULT_MODEL, ids, rec, params.seed or 0, params.temperature,
            params.top_p, res.finish_reason, extras=extras_of(params),
        )  # fmt: skip
    finally:
        provider.recorder = None
    c = cm.decode(c.encode())
    return res, c, cm.judge(c, verifier.audit(ids, c, n), SAME, n)


def test_penalised_biased_answer_with_logprobs_is_committed_and_passes(engine) -> None:
    banned = engine.tokenize(" Wednesday", add_bos=False)[0]
    a = adj.make(0.5, 1.0, {str(banned): -100})
    params = SamplingParams(0.8, 0.95, 11, a, logprobs=3)
    res, c, verdict = _serve_and_audit(engine, engine, params)
    assert verdict.passed, verdict.reasons
    assert c.header.extras.adjust == a and c.header.extras.top_logprobs == 3
    assert banned not in [p.token_id for p in res.pieces]
    # The reported values are the engine's own adjusted distribution at each position.
    ids = engine.tokenize(PROMPT)
    tokens = [p.token_id for p in res.pieces if p.token_id >= 0]
    counts: dict[int, int] = {}
    rows: list[np.ndarray] = []
    engine.replay_states(ids, tokens, lambda r, lg: rows.append(np.array(lg)))
    for piece, lg in zip(res.pieces, rows, strict=False):
        z = adj.adjust_logits(lg, counts, a)
        want = lpm.token_logprobs(z, piece.token_id, adj.f32(0.8), 3)  # as committed
        assert piece.logprobs == want
        adj.count(counts, piece.token_id)


@pytest.mark.parametrize(
    ("cheat", "reason"),
    [
        (cheats.LlamaPenaltySkipping, "not the one the seed samples"),
        (cheats.LlamaLogprobInventing, "logprobs are not the model's"),
    ],
)
def test_penalty_skipping_and_logprob_inventing_fail_their_audits(
    engine, cheat: type, reason: str
) -> None:
    liar = cheat(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    try:
        params = SamplingParams(1.0, 1.0, 5, adj.make(2.0, 2.0), logprobs=2)
        _, _, verdict = _serve_and_audit(liar, engine, params, n=24)
    finally:
        liar.close()
    assert not verdict.passed
    assert any(reason in r for r in verdict.reasons), verdict.reasons
    assert verdict.worst_rel == 0.0  # the hidden states are honest: only the lie shows


def _wait(cond, timeout_s: float = 90.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        ev.wait(0.05)
    raise TimeoutError("condition not reached")


def test_openai_client_on_a_llama_cpp_grid(tmp_path: Path, engine) -> None:
    verifier = LlamaCppEngine(DEFAULT_MODEL, threads=2, context_length=CONTEXT)
    with provider_and_verifier(tmp_path, engine, verifier) as (coord, http, key, client):
        prompt = "Repeat the word forever: apple apple apple apple"

        def toks(**kw: object) -> list[str]:
            out = client.completions.create(
                model=DEFAULT_MODEL, prompt=prompt, max_tokens=24, temperature=0.7, seed=3,
                logprobs=0, **kw,
            )  # fmt: skip
            assert out.choices[0].logprobs is not None
            return list(out.choices[0].logprobs.tokens or [])

        plain, penalised = toks(), toks(frequency_penalty=2.0)
        assert len(plain) - len(set(plain)) > len(penalised) - len(set(penalised))
        apple = engine.tokenize(" apple", add_bos=False)[0]
        banned = toks(logit_bias={str(apple): -100})
        assert " apple" in plain and " apple" not in banned
        # Chat logprobs, whole and streamed: the same values, the engine's own.
        msgs = [{"role": "user", "content": "Say hello."}]
        whole = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
            top_logprobs=2,
        )  # fmt: skip
        content = whole.choices[0].logprobs.content
        assert content and all(len(e.top_logprobs) == 2 for e in content)
        assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
        assert "".join(e.token for e in content) == whole.choices[0].message.content
        streamed = []
        with client.chat.completions.create(
            model=DEFAULT_MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
            top_logprobs=2, stream=True,
        ) as stream:  # fmt: skip
            for chunk in stream:
                for ch in chunk.choices:
                    if ch.logprobs and ch.logprobs.content:
                        streamed += [(e.token, e.logprob) for e in ch.logprobs.content]
        assert streamed == [(e.token, e.logprob) for e in content]
        # Greedy: the first token's logprob is the engine's own at temperature 1.
        ids = engine.tokenize(whole_prompt := _chat_prompt(engine, msgs))
        assert whole_prompt
        first: list[np.ndarray] = []
        engine.replay_states(ids, [0], lambda r, lg: first.append(np.array(lg)))
        want = lpm.token_logprobs(first[0], int(np.argmax(first[0])), 0.0, 2)
        assert content[0].logprob == want.logprob

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        _wait(lambda: len(audits()) >= 5 and all(a["state"] in ("passed", "failed")
                                                 for a in audits()))  # fmt: skip
        assert all(a["state"] == "passed" for a in audits()), [a["verdict"] for a in audits()]


def _chat_prompt(engine: LlamaCppEngine, msgs: list[dict[str, str]]) -> str:
    from idlegrid.engines.base import render_chat

    return render_chat(engine, msgs)


DAY = {
    "type": "json_schema",
    "json_schema": {
        "name": "Day",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"day": {"type": "string"}, "number": {"type": "integer"}},
            "required": ["day", "number"],
            "additionalProperties": False,
        },
    },
}


def test_schema_penalty_and_logprobs_in_one_request_are_committed_and_pass(
    tmp_path: Path, engine
) -> None:
    """One chat request with response_format (json_schema), frequency_penalty and logprobs:
    per position the penalty, then the grammar's mask, then the seeded draw; the logprobs
    sent are the engine's masked distribution; the commitment (version 2, with the grammar)
    is audited by a verifier that replays all of it, and passes."""
    verifier = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=CONTEXT)
    with provider_and_verifier(tmp_path, engine, verifier) as (coord, http, key, client):
        msgs = [{"role": "user", "content": "Give today's day of the week as JSON."}]
        out = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=msgs, max_tokens=40, temperature=0.8, seed=5,  # type: ignore[arg-type]
            frequency_penalty=1.0, logprobs=True, top_logprobs=2,
            response_format=DAY,  # type: ignore[arg-type]
        )  # fmt: skip
        choice = out.choices[0]
        text = choice.message.content or ""
        if choice.finish_reason == "stop":
            assert set(json.loads(text)) == {"day", "number"}, text
        assert choice.logprobs is not None and choice.logprobs.content
        content = choice.logprobs.content
        assert "".join(e.token for e in content) == text

        # The engine's own numbers: the same generation here, then replayed position by
        # position as adjust → mask → log-softmax at the committed temperature.
        spec = grammar.from_response_format(DAY)
        assert spec is not None
        ids = engine.tokenize(_chat_prompt(engine, msgs))
        a = adj.make(0.0, 1.0)
        res = Generation()
        params = SamplingParams(0.8, 1.0, 5, a, logprobs=2, grammar=spec)
        for _ in stream_pieces(engine, ids, params, max_tokens=40, result=res):
            pass
        tokens = [p.token_id for p in res.pieces if p.token_id >= 0]
        assert res.text == text and len(tokens) == len(content)
        rows: list[np.ndarray] = []
        engine.replay_states(ids, tokens, lambda r, lg: rows.append(np.array(lg)))
        matcher, counts = engine.matcher(spec), {}
        penalty_mattered = mask_mattered = False
        for tok, lg, got in zip(tokens, rows, content, strict=True):
            ok = grammar.allowed(matcher.mask(), len(lg))
            z = grammar.masked(adj.adjust_logits(lg, counts, a), ok)
            want = lpm.token_logprobs(z, tok, adj.f32(0.8), 2)
            assert got.logprob == want.logprob
            assert [e.logprob for e in got.top_logprobs] == [v for _, v in want.top]
            unpenalised = lpm.token_logprobs(grammar.masked(lg, ok), tok, adj.f32(0.8), 2)
            unmasked = lpm.token_logprobs(adj.adjust_logits(lg, counts, a), tok, adj.f32(0.8), 2)
            penalty_mattered |= unpenalised != want
            mask_mattered |= unmasked != want
            assert matcher.consume(tok)
            adj.count(counts, tok)
        assert penalty_mattered and mask_mattered

        def audits() -> list[dict]:
            return [a for a in http.get("/api/v1/audits").json()["audits"] if not a["canary"]]

        _wait(lambda: len(audits()) >= 1 and all(a["state"] in ("passed", "failed")
                                                 for a in audits()), 180)  # fmt: skip
        assert all(a["state"] == "passed" for a in audits()), [a["verdict"] for a in audits()]
