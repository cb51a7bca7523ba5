"""Verifier compute as a share of generation at the default audit and canary rates (issue 15).

    PYTHONPATH=src python bench/bench_verifier_share.py [--rounds 3] [--tokens 16,64,256]

What a grid spends on verification per answer is (real audits + canaries) × the cost of one
audit. The audit rate is the policy's steady rate for that request (`AuditPolicy.rate`: it
follows the stake at risk in units of the request's charge, so it depends on the answer's
length at the default prices, 10/40 credits per 1M prompt/output tokens, and the default
5-credit inference stake). Canaries are a share φ of the audits (default 0.1); the baseline
in the same run is the previous rule, canaries on a flat 2 % of answers. The cost of one
audit relative to its generation is measured here: the default model (llama.cpp, Gemma 3 270M
Q4_K_M, one thread) generates a committed answer (recording + commitment included) and then
audits it, CPU time of each, interleaved round by round.

Commitment cost on the path a default provider serves (`BatchedLlama` slots, issue 19: the
prompt's last token goes in the first batched step, so no state is recomputed after the
answer): process CPU of a recorded generation (hidden-state output on) plus building and
encoding its commitment, against the same tokens from a batched engine with no hidden-state
output, interleaved round by round after a warm-up round.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.trust.settings import TrustSettings
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust.economics import AuditPolicy
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.batched import BatchedLlama
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL

PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather.",
]
PROMPT_PRICE, OUTPUT_PRICE = 10, 40  # µcr per token: `idlegrid provide`'s default prices
OLD_CANARY_PER_ANSWER = 0.02
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)


def measure(eng: LlamaCppEngine, n: int, rounds: int) -> tuple[list[float], int]:
    """Audit CPU / generation CPU per round for n-token answers, and the prompt length."""
    ratios, prompt_len = [], 0
    for r in range(rounds):
        ids = eng.tokenize(PROMPTS[r % len(PROMPTS)])
        prompt_len = max(prompt_len, len(ids))
        params = SamplingParams(1.0, 1.0, 5000 + r)
        rec = Recorder()
        eng.recorder = rec
        t0 = time.thread_time()
        toks = []
        for tok in eng.generate(ids, params):
            toks.append(tok)
            if len(toks) >= n:
                break
        eng.recorder = None
        c = build_commitment(eng, DEFAULT_MODEL, ids, rec, params.seed or 0, 1.0, 1.0, "length")
        gen = time.thread_time() - t0
        t1 = time.thread_time()
        verdict = cm.judge(c, eng.audit(ids, c, n), TOL, n)
        audit = time.thread_time() - t1
        assert verdict.passed, verdict.reasons
        ratios.append(audit / gen)
    return ratios, prompt_len


class Unrecorded(BatchedLlama):
    """The batched engine with no hidden-state output: what serving costs without commitments."""

    def _embeddings(self, on: bool) -> None:
        super()._embeddings(False)

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lg = self._lib.llama_get_logits_ith(self._ctx, i)
        return np.zeros(self._n_embd, np.float32), np.ctypeslib.as_array(lg, shape=(self._n_vocab,))


def _run(slot: Any, ids: list[int], params: SamplingParams, n: int) -> int:
    """Take up to n tokens of one answer; how many came (fewer: the model ended it)."""
    got = 0
    for got, _ in enumerate(slot.generate(ids, params), 1):
        if got >= n:
            break
    return got


def commitment_cost(eng: LlamaCppEngine, n: int, rounds: int) -> tuple[float, float]:
    """(recorded generation + commitment) / generation without hidden-state output, CPU,
    on batched slots, paired per round with the order alternating (whichever runs second
    in a pair is measured slower on this VM): median and max over rounds, after a warm-up."""
    served, bare = BatchedLlama(eng, 2), Unrecorded(eng, 2)
    slot, plain = served.slots()[0], bare.slots()[0]
    shares = []
    try:
        for r in range(rounds + 1):
            ids = eng.tokenize(PROMPTS[r % len(PROMPTS)])
            params = SamplingParams(1.0, 1.0, 7000 + r)
            spent = {}
            for which in ("plain", "recorded") if r % 2 else ("recorded", "plain"):
                t0 = time.process_time()
                if which == "plain":
                    _run(plain, ids, params, n)
                    spent[which] = time.process_time() - t0
                    continue
                rec = Recorder()
                slot.recorder = rec
                ended = "length" if _run(slot, ids, params, n) >= n else "stop"
                slot.recorder = None
                c = build_commitment(eng, DEFAULT_MODEL, ids, rec, 7000 + r, 1.0, 1.0, ended)
                c.encode()
                spent[which] = time.process_time() - t0
            assert cm.judge(c, eng.audit(ids, c, n), TOL, n).passed
            if r:
                shares.append(spent["recorded"] / spent["plain"] - 1)
    finally:
        served.close()
        bare.close()
    return statistics.median(shares), max(shares)


def main() -> None:
    """Measure audit/generation CPU per answer length and print the verifier share table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", default="16,64,256")
    args = ap.parse_args()
    trust = TrustSettings()
    stake = CoordinatorSettings().inference_stake
    policy = AuditPolicy(full_audits=trust.full_audits, halving=trust.halving)
    eng = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=1024)
    print(
        f"default stake {stake / 1e6:g} credits, prices {PROMPT_PRICE}/{OUTPUT_PRICE} credits "
        f"per 1M tokens, canaries φ = {trust.canary_rate:g} of audits (before: "
        f"{OLD_CANARY_PER_ANSWER:.0%} of answers); {args.rounds} rounds per length"
    )
    print(
        "| output tokens | charge (µcr) | S/R | steady audit rate | audit/generation CPU "
        "(median) | verifier share now | before |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in (int(t) for t in args.tokens.split(",")):
        ratios, prompt_len = measure(eng, n, args.rounds)
        ratio = statistics.median(ratios)
        charge = prompt_len * PROMPT_PRICE + n * OUTPUT_PRICE
        at_risk = stake / charge
        rate = policy.steady_at(stake=at_risk)
        now = rate * (1 + trust.canary_rate) * ratio
        before = (rate + OLD_CANARY_PER_ANSWER) * ratio
        print(
            f"| {n} | {charge} | {at_risk:,.0f} | {rate:.4%} | {ratio:.2f} | "
            f"**{now:.3%}** | {before:.3%} |"
        )
    for n in (int(t) for t in args.tokens.split(",")):
        med, worst = commitment_cost(eng, n, max(args.rounds * 4, 12))
        print(
            f"commitment cost on a batched slot, {n} tokens: median {med:.2%}, max {worst:.2%} "
            "(recorded + commitment CPU over the same tokens with no hidden-state output)"
        )
    # Where the share reaches 2 %: the request size at which the stake at risk per request
    # makes the steady rate 2 % / ((1 + φ) × ratio).
    limit = 0.02 / ((1 + trust.canary_rate) * ratio)
    s_over_r = next(s for s in range(1, 100_000) if policy.steady_at(stake=s) <= limit)
    print(
        f"verifier share ≤ 2 % while S/R ≥ {s_over_r} (a charge ≤ {stake / s_over_r:,.0f} µcr, "
        f"≈ {stake / s_over_r / OUTPUT_PRICE:,.0f} output tokens at the default price), at the "
        f"last measured audit/generation ratio"
    )


if __name__ == "__main__":
    main()
