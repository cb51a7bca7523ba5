"""Structured outputs: decode rate with a JSON schema ÷ unconstrained, same prompts, same run.

    PYTHONPATH=src python bench/bench_grammar.py --rounds 6 --tokens 64

llama.cpp, the default model, 1 thread, commitments on (as an agent serves). Each round runs
every prompt unconstrained and then under the schema, back to back with the same seed, so
load on the machine hits both alike. Decode rate counts from the first token to the last
(prefill and the one-off grammar compile excluded; the tokenizer is built before timing), by
the wall clock and by this thread's CPU time (llama.cpp on 1 thread computes on the calling
thread). Reported: medians per arm and their ratio (target ≥ 0.90), and the grammar's own
cost per token (mask + applying it), timed inside the constrained runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from idlegrid.core import grammar
from idlegrid.engines.base import SamplingParams, render_chat
from idlegrid.engines.commit import Recorder
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "summary": {"type": "string", "maxLength": 400},
        "year": {"type": "integer"},
        "genre": {"enum": ["fiction", "history", "science", "poetry"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 6},
    },
    "required": ["title", "summary", "year", "genre", "tags"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a book you like as JSON.",
    "Give me a JSON record for a history book.",
    "Write JSON describing a poetry collection.",
]


class Timed:
    """A matcher wrapper that adds up the time spent computing masks."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.spent, self.steps = inner, 0.0, 0

    def mask(self) -> Any:
        t0 = time.perf_counter()
        m = self.inner.mask()
        self.spent += time.perf_counter() - t0
        self.steps += 1
        return m

    def consume(self, token: int) -> bool:
        return bool(self.inner.consume(token))


def run(engine: LlamaCppEngine, ids: list[int], params: SamplingParams, n: int) -> dict[str, float]:
    """Decode `n` tokens (or to the end); rates from the first token to the last."""
    engine.recorder = Recorder()
    stamps: list[tuple[float, float]] = []
    try:
        for tok in engine.generate(ids, params):
            stamps.append((time.perf_counter(), time.thread_time()))
            if len(stamps) >= n or engine.is_end(tok):
                break
        engine.recorder.finish()
    finally:
        engine.recorder = None
    k = len(stamps) - 1
    wall = stamps[-1][0] - stamps[0][0]
    cpu = stamps[-1][1] - stamps[0][1]
    return {"tokens": len(stamps), "wall_tps": k / wall, "cpu_tps": k / cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    spec = grammar.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}}
    )
    assert spec is not None
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=1)
    timers: list[Timed] = []
    original = engine.matcher

    def timed_matcher(s: grammar.GrammarSpec, prefix: Any = ()) -> Timed:
        t = Timed(original(s, prefix))
        timers.append(t)
        return t

    engine.matcher = timed_matcher  # type: ignore[method-assign]
    try:
        engine.matcher(spec)  # build the tokenizer once, outside the timings
        timers.clear()
        rows: dict[str, list[dict[str, float]]] = {"plain": [], "schema": []}
        short = 0
        for r in range(args.rounds):
            for i, prompt in enumerate(PROMPTS):
                ids = engine.tokenize(render_chat(engine, [{"role": "user", "content": prompt}]))
                seed = 1000 * r + i
                rows["plain"].append(run(engine, ids, SamplingParams(1.0, 1.0, seed), args.tokens))
                con = SamplingParams(1.0, 1.0, seed, grammar=spec)
                rows["schema"].append(run(engine, ids, con, args.tokens))
                short += rows["schema"][-1]["tokens"] < 8
        for unit in ("wall_tps", "cpu_tps"):
            plain = statistics.median(x[unit] for x in rows["plain"])
            con_m = statistics.median(x[unit] for x in rows["schema"])
            print(
                f"{unit}: unconstrained {plain:.2f}  schema {con_m:.2f}  ratio {con_m / plain:.3f}"
            )
        ratios = [
            s["cpu_tps"] / p["cpu_tps"] for p, s in zip(rows["plain"], rows["schema"], strict=True)
        ]
        print(
            f"per-pair cpu ratio: median {statistics.median(ratios):.3f} "
            f"min {min(ratios):.3f} max {max(ratios):.3f}"
        )
        steps = sum(t.steps for t in timers)
        mask_ms = 1e3 * sum(t.spent for t in timers) / max(steps, 1)
        toks = [x["tokens"] for x in rows["schema"]]
        print(
            f"grammar mask: {mask_ms:.3f} ms/token over {steps} steps; schema answers "
            f"{statistics.median(toks):.0f} tokens (median), {short} under 8"
        )
        logits = np.random.default_rng(0).standard_normal(engine._n_vocab).astype(np.float32)
        words = timers[-1].inner.mask()
        t0 = time.perf_counter()
        for _ in range(200):
            grammar.apply_mask(logits, words)
        print(f"applying a mask to {len(logits)} logits: {5 * (time.perf_counter() - t0):.3f} ms")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
