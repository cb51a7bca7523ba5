"""What auditing a batched answer costs the verifier, against what generating it cost (issue 19).

    PYTHONPATH=src python bench/bench_batched_audit_cost.py [--widths 1,2,4,8] [--tokens 64]

A batched answer is replayed at its recorded row of a batch of its recorded size, the other
rows dummy sequences (engines/batched.BatchedLlama.replay), so one audit pays for the whole
width at every step. Per width W: one `BatchedLlama` of W slots on the default model
generates W seeded, committed answers at once (recording included; process CPU time of the
whole batch, every thread); then the engine's own `audit` (what a verifier agent runs)
replays each, and each verdict must pass with error 0. Reported: audit CPU ÷ the provider's
per-sequence generation CPU (the batch's CPU ÷ W), median over the W answers and rounds;
then the verifier's share at the default audit rate for a 64-token answer (the steady rate
at the default stake and prices, canaries φ of the audits; bench/bench_verifier_share.py).
The first audit at each width makes the verifier's replay context and is left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Iterator

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.trust.settings import TrustSettings
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust.economics import AuditPolicy
from idlegrid.engines.base import SamplingParams
from idlegrid.engines.batched import BatchedLlama
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL

# Prompts of one length in tokens would start every sequence in the same step; these differ,
# so the recorded shapes include the ragged first steps a real batch has.
PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather.",
    "Here is a long list of European cities:\n1.",
    "The history of the printing press begins",
    "Ingredients for a simple bread recipe:\n-",
    "The capital of France is",
]
PROMPT_PRICE, OUTPUT_PRICE = 10, 40  # µcr per token: `idlegrid provide`'s default prices
TEMPERATURE = 0.8
TOL = cm.Tolerance(rel=1e-4, rank_slack=1e-4, margin=1e-3)


def _consume(it: Iterator[int], n: int, out: list[int]) -> None:
    for token in it:
        out.append(token)
        if len(out) >= n:
            break
    getattr(it, "close", lambda: None)()


def one_width(
    eng: LlamaCppEngine, width: int, tokens: int, rnd: int
) -> tuple[float, list[float], list[int], float]:
    """(batch generation CPU s, audit CPU s per answer, tokens per answer, mean step width)."""
    b = BatchedLlama(eng, width, context_per_seq=256)
    try:
        jobs = []
        t0 = time.process_time()
        for i in range(width):
            ids = eng.tokenize(PROMPTS[i % len(PROMPTS)])
            rec, out = Recorder(), []
            seed = 1000 * rnd + i
            it = b.generate(ids, SamplingParams(TEMPERATURE, 1.0, seed=seed), rec)
            jobs.append(
                (ids, rec, out, seed, threading.Thread(target=_consume, args=(it, tokens, out)))
            )
        for *_, t in jobs:
            t.start()
        for *_, t in jobs:
            t.join()
        commits = [
            build_commitment(eng, DEFAULT_MODEL, ids, rec, seed, TEMPERATURE, 1.0, "length")
            for ids, rec, _, seed, _ in jobs
        ]
        gen = time.process_time() - t0
        steps = list(b.step_sizes)
    finally:
        b.close()
    audits = []
    for (ids, _, out, _, _), c in zip(jobs, commits, strict=True):
        t1 = time.process_time()
        verdict = cm.judge(c, eng.audit(ids, c, len(out)), TOL, len(out))
        audits.append(time.process_time() - t1)
        assert verdict.passed and verdict.worst_rel == 0.0, verdict.reasons
    return gen, audits, [len(o) for *_, o, _, _ in jobs], statistics.mean(steps)


def main() -> None:
    """Per width: audit CPU ÷ per-sequence generation CPU, and the verifier's share."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    trust = TrustSettings()
    stake = CoordinatorSettings().inference_stake
    policy = AuditPolicy(full_audits=trust.full_audits, halving=trust.halving)
    eng = LlamaCppEngine(DEFAULT_MODEL, threads=a.threads, context_length=1024)
    prompt_len = max(len(eng.tokenize(p)) for p in PROMPTS)
    rate = policy.steady_at(stake=stake / (prompt_len * PROMPT_PRICE + a.tokens * OUTPUT_PRICE))
    print(
        f"{DEFAULT_MODEL}, {a.threads} engine thread(s), {a.tokens}-token answers at T "
        f"{TEMPERATURE}, {a.rounds} rounds; load average {os.getloadavg()[0]:.1f} at start; "
        f"steady audit rate {rate:.3%} (+ canaries φ = {trust.canary_rate:g} of it)"
    )
    print(
        "| width | mean step width | gen CPU per sequence (s) | audit CPU (s) | "
        "audit ÷ gen per sequence (per token) | verifier share at the default rate |"
    )
    print("|---|---|---|---|---|---|")
    for w in widths:
        ratios, per_seq, audit_s, mean_w = [], [], [], []
        short = 0
        for r in range(a.rounds):
            gen, audits, lens, mw = one_width(eng, w, a.tokens, r)
            # The first audit at a width made the replay context: a setup cost, left out.
            kept = audits[1:] if r == 0 and len(audits) > 1 else audits
            # Per token, so an answer that ended early at its end token counts fairly; with
            # every answer at full length this is audit ÷ (batch CPU ÷ W).
            gen_tok = gen / sum(lens)
            per_seq.append(gen / w)
            audit_s += kept
            kept_lens = lens[len(lens) - len(kept) :]
            ratios += [x / n / gen_tok for x, n in zip(kept, kept_lens, strict=True)]
            mean_w.append(mw)
            short += sum(n < a.tokens for n in lens)
        ratio = statistics.median(ratios)
        share = rate * (1 + trust.canary_rate) * ratio
        print(
            f"| {w} | {statistics.mean(mean_w):.1f} | {statistics.median(per_seq):.2f} | "
            f"{statistics.median(audit_s):.2f} | {ratio:.2f} | **{share:.3%}** |"
            + (f" ({short} answers ended early)" if short else "")
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    eng.close()


if __name__ == "__main__":
    main()
