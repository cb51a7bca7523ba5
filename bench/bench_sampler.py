"""Decode speed with penalties, logit_bias and logprobs ÷ without, same engine, same run.

The default engine (llama.cpp, gemma3:270m Q4_K_M, one thread), one prompt, 64 tokens at
temperature 0.8 / top_p 0.95, commitments on (as a provider serves): rounds alternate
plain and adjusted so that machine noise hits both alike; the median of each is reported.
Adjusted = presence 0.5, frequency 0.5, 10 biased tokens, logprobs with 5 alternatives.

    PYTHONPATH=src python bench/bench_sampler.py [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from idlegrid.core.trust import adjust as adj
from idlegrid.engines.base import Generation, SamplingParams, stream_pieces
from idlegrid.engines.commit import Recorder, build_commitment
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL
from idlegrid.engines.steps import extras_of


def _run(engine: LlamaCppEngine, ids: list[int], params: SamplingParams, n: int) -> float:
    rec, res = Recorder(), Generation()
    engine.recorder = rec
    try:
        t0 = time.perf_counter()
        for _ in stream_pieces(engine, ids, params, max_tokens=n, result=res):
            pass
        build_commitment(engine, DEFAULT_MODEL, ids, rec, params.seed or 0, params.temperature,
                         params.top_p, res.finish_reason, extras=extras_of(params))  # fmt: skip
        dt = time.perf_counter() - t0
    finally:
        engine.recorder = None
    return len(rec.tokens) / dt


def main() -> None:
    """Print plain and adjusted decode tok/s and their ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=1, context_length=512)
    try:
        ids = engine.tokenize("Write a long story about a lighthouse keeper and the sea.")
        plain = SamplingParams(0.8, 0.95, 7)
        bias = {str(1000 + 37 * i): (-100 if i % 2 else 5) for i in range(10)}
        adjusted = SamplingParams(0.8, 0.95, 7, adj.make(0.5, 0.5, bias), logprobs=5)
        _run(engine, ids, plain, 8)  # warm-up
        a, b = [], []
        for _ in range(args.rounds):
            a.append(_run(engine, ids, plain, args.tokens))
            b.append(_run(engine, ids, adjusted, args.tokens))
        pa, pb = statistics.median(a), statistics.median(b)
        print(f"plain    {pa:.1f} tok/s  {[round(x, 1) for x in a]}")
        print(f"adjusted {pb:.1f} tok/s  {[round(x, 1) for x in b]}")
        print(f"ratio    {pb / pa:.3f}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
