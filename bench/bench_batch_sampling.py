"""Per-row vs vectorised sampling of a batched step, and what it does to aggregate tok/s.

    PYTHONPATH=src python bench/bench_batch_sampling.py --requests 8 --tokens 64 --rounds 3

One `BatchedLlama` on the default model serves N concurrent seeded requests (T 0.8,
top_p 1); rounds alternate `vector` off (each row through `Steps.pick`) and on
(`core/trust/batch_sampling.choose_rows`), in ABBA order, so load on the shared machine
hits both alike.
Per round: sampling-and-reading ms per step, decode ms per step, aggregate tokens/s; then
a sampler-only comparison on one step's real logits (N rows), interleaved repeats.
Medians; ratios from the same run. Both modes must produce the same texts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_batched_engine import PROMPTS, new_path  # noqa: E402

from idlegrid.core.trust import batch_sampling, sampling  # noqa: E402
from idlegrid.engines.base import SamplingParams  # noqa: E402
from idlegrid.engines.batched import BatchedLlama  # noqa: E402
from idlegrid.engines.llamacpp import LlamaCppEngine  # noqa: E402
from idlegrid.engines.models import DEFAULT_MODEL  # noqa: E402


def texts(b: BatchedLlama, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Each request's tokens (one after another here: only the draws are compared)."""
    out = []
    for i, ids in enumerate(prompts):
        it = b.generate(ids, SamplingParams(0.8, 1.0, seed=i))
        toks = [t for _, t in zip(range(n), it, strict=False)]
        it.close()
        out.append(toks)
    return out


def first_logits(engine: LlamaCppEngine, ids: list[int]) -> np.ndarray:
    """The logits after a prompt's first generated token (the engine's own context)."""
    it = engine.generate(ids, SamplingParams(0.8, 1.0, seed=0))
    next(it)
    out: np.ndarray = engine._logits().copy()
    it.close()
    return out


def main() -> None:
    """Alternate per-row and vectorised rounds; print medians and ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    engine = LlamaCppEngine(DEFAULT_MODEL, threads=args.threads, context_length=1024)
    b = BatchedLlama(engine, args.requests, context_per_seq=256)
    prompts = [engine.tokenize(PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    rows: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for vector in (False, True) if r % 2 == 0 else (True, False):  # ABBA: no order bias
            b.vector = vector
            b.decode_s = b.sample_s = 0.0
            b.step_sizes.clear()
            wall, _, total = new_path(b, prompts, args.tokens)
            steps = max(1, len(b.step_sizes))
            rows[vector].append(
                (1000 * b.sample_s / steps, 1000 * b.decode_s / steps, total / wall)
            )
    b.vector = False
    ref = texts(b, prompts, 16)
    b.vector = True
    same = texts(b, prompts, 16) == ref
    print(f"{args.requests} requests x {args.tokens} tokens, {args.threads} threads, "
          f"{args.rounds} rounds (medians); same tokens both ways: {same}")  # fmt: skip
    print(f"{'sampling':<10} {'sample ms/step':>15} {'decode ms/step':>15} {'tok/s':>8}")
    med = {k: [statistics.median(c) for c in zip(*v, strict=True)] for k, v in rows.items()}
    for vector, (smp, dec, rate) in med.items():
        print(f"{'vector' if vector else 'per-row':<10} {smp:>15.1f} {dec:>15.1f} {rate:>8.1f}")
    print(f"vector / per-row: sampling {med[True][0] / med[False][0]:.2f}x, "
          f"aggregate tok/s {med[True][2] / med[False][2]:.2f}x")  # fmt: skip
    # The sampler alone on real logits: one step of N rows.
    lg = np.stack([first_logits(engine, ids) for ids in prompts])
    seeds, pos = list(range(args.requests)), [40 + i for i in range(args.requests)]
    temps, tops = [0.8] * args.requests, [1.0] * args.requests
    times: dict[str, list[float]] = {"per-row": [], "vector": []}
    for _ in range(30):
        t0 = time.perf_counter()
        [sampling.choose(lg[i], seeds[i], pos[i], 0.8, 1.0) for i in range(args.requests)]
        t1 = time.perf_counter()
        batch_sampling.choose_rows(lg, seeds, pos, temps, tops)
        t2 = time.perf_counter()
        times["per-row"].append(t1 - t0)
        times["vector"].append(t2 - t1)
    a, v = (1000 * statistics.median(times[k]) for k in ("per-row", "vector"))
    print(f"sampler only, {args.requests} rows x {lg.shape[1]} vocab: per-row {a:.1f} ms, "
          f"vector {v:.1f} ms ({a / v:.2f}x)")  # fmt: skip
    b.close()
    engine.close()


if __name__ == "__main__":
    main()
