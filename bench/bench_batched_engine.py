"""Continuous batching vs one request at a time, on one llama.cpp engine copy.

    PYTHONPATH=src python bench/bench_batched_engine.py --requests 8 --tokens 64 --threads 2

N requests arrive at once. Old path: the engine serves them one after another (what one
provider slot does today: the others queue). New path: `engines/batched.BatchedLlama`
decodes all of them in one batch per step, each consumed from its own thread. Both record
hidden states (what a commitment needs) and sample with the same seeded sampler. Rounds
alternate old/new on the same loaded model, so load on the shared machine hits both alike.
Reports aggregate tokens/s (all tokens / wall time), time to first token p50/p95 (from the
moment all requests arrived), and the new/old ratio, medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from idlegrid.engines.base import SamplingParams
from idlegrid.engines.batched import BatchedLlama
from idlegrid.engines.commit import Recorder
from idlegrid.engines.llamacpp import LlamaCppEngine
from idlegrid.engines.models import DEFAULT_MODEL

PROMPTS = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Write a short letter to a friend about the weather.",
    "The capital of France is",
    "In 1969, the first humans",
    "A recipe for bread:",
    "The quick brown fox",
]


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def old_path(
    engine: LlamaCppEngine, prompts: list[list[int]], n: int
) -> tuple[float, list[float], int]:
    """One request after another on the engine; wall seconds, TTFTs, tokens."""
    t0 = time.perf_counter()
    ttft, total = [], 0
    for i, ids in enumerate(prompts):
        engine.recorder = Recorder()
        got = 0
        for _ in engine.generate(ids, SamplingParams(0.8, 1.0, seed=i)):
            if got == 0:
                ttft.append(time.perf_counter() - t0)
            got += 1
            if got >= n:
                break
        engine.recorder = None
        total += got
    return time.perf_counter() - t0, ttft, total


def new_path(b: BatchedLlama, prompts: list[list[int]], n: int) -> tuple[float, list[float], int]:
    """All requests in one batch; wall seconds, TTFTs, tokens."""
    ttft: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    its = [
        b.generate(ids, SamplingParams(0.8, 1.0, seed=i), Recorder())
        for i, ids in enumerate(prompts)
    ]

    def consume(it: object) -> None:
        got = 0
        for _ in it:  # type: ignore[attr-defined]
            if got == 0:
                with lock:
                    ttft.append(time.perf_counter() - t0)
            got += 1
            if got >= n:
                break
        it.close()  # type: ignore[attr-defined]
        with lock:
            counts.append(got)

    threads = [threading.Thread(target=consume, args=(it,)) for it in its]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, ttft, sum(counts)


def main() -> None:
    """Alternate old and new rounds; print medians and the ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=args.threads, context_length=1024)
    b = BatchedLlama(engine, args.requests, context_per_seq=256)
    prompts = [engine.tokenize(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    rows: dict[str, list[tuple[float, float, float]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, fn in (("old", lambda: old_path(engine, prompts, args.tokens)),
                         ("new", lambda: new_path(b, prompts, args.tokens))):  # fmt: skip
            wall, ttft, total = fn()
            rows[name].append((total / wall, pct(ttft, 0.5), pct(ttft, 0.95)))
    print(f"{args.requests} requests x {args.tokens} tokens, {args.threads} threads, "
          f"{args.rounds} rounds (medians)")  # fmt: skip
    print(f"{'path':<5} {'tok/s':>8} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    med = {k: [statistics.median(c) for c in zip(*v, strict=True)] for k, v in rows.items()}
    for name, (rate, p50, p95) in med.items():
        print(f"{name:<5} {rate:>8.1f} {p50:>11.2f} {p95:>11.2f}")
    print(f"new / old aggregate: {med['new'][0] / med['old'][0]:.2f}x")
    sizes = b.step_sizes
    print(f"batched steps: {len(sizes)}, mean batch {sum(sizes) / max(1, len(sizes)):.2f}")
    print(f"per step: decode {1000 * b.decode_s / max(1, len(sizes)):.1f} ms, sampling and "
          f"reading rows {1000 * b.sample_s / max(1, len(sizes)):.1f} ms "
          f"({b.sample_s / max(b.decode_s, 1e-9):.1%} of decode)")  # fmt: skip
    b.close()
    engine.close()


if __name__ == "__main__":
    main()
