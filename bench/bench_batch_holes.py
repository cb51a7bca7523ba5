"""Holes in a llama.cpp batch: what closing them (`BatchedLlama._compact`) is worth.

    PYTHONPATH=src python bench/bench_batch_holes.py [--clients 8] [--requests 48] [--rounds 4]

A closed loop of `--clients` threads, each sending requests of varied lengths (seeded, 8-96
tokens) one after another into one `BatchedLlama`, so sequences end at different times and
leave free slots below running ones. With compaction the sequence in the highest slot moves
down into the hole (its KV stream copied); without, the step decodes as several ubatches of
consecutive slots. Rounds alternate on the same batch; prints aggregate tokens/s, the mean
step width, the share of steps with a hole, and the ratio (medians over rounds).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

from idlegrid.engines.base import SamplingParams
from idlegrid.engines.batched import BatchedLlama
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
    "The history of the printing press begins",
]


def run(
    b: BatchedLlama, engine: LlamaCppEngine, clients: int, requests: int
) -> tuple[float, float, float]:
    """(aggregate tok/s, mean step width, share of gapped steps) of one closed-loop round."""
    rng = random.Random(7)
    jobs = [(rng.choice(PROMPTS), rng.randint(8, 96), k) for k in range(requests)]
    lock, done = threading.Lock(), [0]
    gapped = [0, 0]
    step = b._step

    def counting(ready: list) -> None:
        sids = [s.sid for s in ready]
        gapped[0] += sids != list(range(sids[0], sids[0] + len(sids)))
        gapped[1] += 1
        step(ready)

    b._step = counting  # type: ignore[method-assign]

    def client() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                prompt, n, seed = jobs.pop()
            it = b.generate(engine.tokenize(prompt), SamplingParams(0.8, 1.0, seed=seed))
            got = 0
            for _ in it:
                got += 1
                if got >= n:
                    break
            it.close()  # type: ignore[attr-defined]
            with lock:
                done[0] += got

    k0 = len(b.step_sizes)
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    b._step = step  # type: ignore[method-assign]
    sizes = b.step_sizes[k0:]
    return done[0] / wall, sum(sizes) / max(len(sizes), 1), gapped[0] / max(gapped[1], 1)


def main() -> None:
    """Alternate rounds with and without compaction; print both and their ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=a.threads, context_length=2048)
    b = BatchedLlama(engine, a.clients, context_per_seq=256)
    res: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    try:
        run(b, engine, a.clients, a.clients)  # warm-up
        for r in range(a.rounds):
            for compact in (True, False) if r % 2 == 0 else (False, True):
                b.compact = compact
                res[compact].append(run(b, engine, a.clients, a.requests))
                x = res[compact][-1]
                print(f"round {r} compact={compact}: {x[0]:.1f} tok/s, mean width {x[1]:.2f}, "
                      f"gapped steps {x[2]:.0%}", flush=True)  # fmt: skip
    finally:
        b.close()
        engine.close()
    ratios = [x[0] / y[0] for x, y in zip(res[True], res[False], strict=True)]
    for compact in (True, False):
        xs = res[compact]
        print(f"compact={compact}: median {statistics.median(x[0] for x in xs):.1f} tok/s, width "
              f"{statistics.median(x[1] for x in xs):.2f}, gapped "
              f"{statistics.median(x[2] for x in xs):.0%}")  # fmt: skip
    print(f"with ÷ without: median {statistics.median(ratios):.2f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)}); moves {b.moves}")  # fmt: skip


if __name__ == "__main__":
    main()
