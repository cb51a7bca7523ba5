"""Issue 19, part 5: what the torch engine's continuous batching (engines/torch_batched)
buys a provider. For each width W: W seeded 64-token generations through one `BatchedTorch`
at once (consumed from threads, as the agent's slots consume them), against the same W
generations decoded one after another by the engine alone (a provider without batching and
one copy of the model), in the same run, alternating, R rounds. Prints aggregate tokens/s of
both, their ratio (median over rounds), and the share of a batched step spent sampling.

    PYTHONPATH=src .venv/bin/python bench/bench_torch_batched.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from idlegrid.engines.base import SamplingParams
from idlegrid.engines.torch_batched import BatchedTorch
from idlegrid.engines.torch_hf import TorchEngine

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a little dragon who",
    "def fibonacci(n):",
    "In 1905 Einstein published",
    "The quick brown fox jumps over",
    "import numpy as np",
    "Water boils at one hundred degrees",
    "My favourite colour is",
]


def solo(engine: TorchEngine, prompts: list[list[int]], tokens: int) -> float:
    """Tokens/s of the prompts decoded one after another, alone."""
    t = time.perf_counter()
    for i, ids in enumerate(prompts):
        it = engine.generate(ids, SamplingParams(0.8, 1.0, seed=i))
        for _ in range(tokens):
            next(it)
        it.close()  # type: ignore[attr-defined]
    return len(prompts) * tokens / (time.perf_counter() - t)


def batched(b: BatchedTorch, prompts: list[list[int]], tokens: int) -> float:
    """Tokens/s of the prompts decoded together, each consumed from its own thread."""

    def take(it: object) -> None:
        for _ in range(tokens):
            next(it)  # type: ignore[call-overload]
        it.close()  # type: ignore[attr-defined]

    t = time.perf_counter()
    its = [b.generate(ids, SamplingParams(0.8, 1.0, seed=i)) for i, ids in enumerate(prompts)]
    threads = [threading.Thread(target=take, args=(it,)) for it in its]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(prompts) * tokens / (time.perf_counter() - t)


def main() -> None:
    """Batched vs one-at-a-time aggregate tokens/s at each width."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--widths", default="1,2,4,8")
    a = ap.parse_args()
    engine = TorchEngine("gemma3:270m", threads=a.threads, context_length=512)
    ids = [engine.tokenize(p) for p in PROMPTS]
    for w in (int(x) for x in a.widths.split(",")):
        b = BatchedTorch(engine, w)
        batched(b, ids[:w], 4)  # warm-up
        b.decode_s = b.sample_s = 0.0
        ratios, bt, st = [], [], []
        for r in range(a.rounds):
            if r % 2:
                s, x = solo(engine, ids[:w], a.tokens), batched(b, ids[:w], a.tokens)
            else:
                x, s = batched(b, ids[:w], a.tokens), solo(engine, ids[:w], a.tokens)
            bt.append(x)
            st.append(s)
            ratios.append(x / s)
        share = b.sample_s / max(b.decode_s + b.sample_s, 1e-9)
        b.close()
        print(
            f"width {w}: batched {statistics.median(bt):.1f} tok/s, alone one after another "
            f"{statistics.median(st):.1f} tok/s, ratio median {statistics.median(ratios):.2f} "
            f"({', '.join(f'{x:.2f}' for x in ratios)}); sampling {share:.0%} of a batched step"
        )


if __name__ == "__main__":
    main()
