"""Embeddings on this CPU: inputs/s and tokens/s of all-MiniLM-L6-v2, what the commitment
adds, what an audit costs the verifier, honest error across thread counts and batch shapes,
and how far the testbed's cheaper models land from the honest vectors.

    PYTHONPATH=src python bench/bench_embeddings.py [--inputs 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from idlegrid.core.trust import embedding as emb
from idlegrid.engines.minilm import MiniLMEngine
from idlegrid.testbed.cheats import MiniLMLowPrecision, MiniLMTruncated

WORDS = ["grid", "audit", "vector", "cosine", "token", "provider", "escrow", "verifier"]


def _texts(n: int) -> list[str]:
    return [f"Sentence {i}: " + " ".join(WORDS[j % 8] for j in range(i % 40 + 3)) for i in range(n)]


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    texts = _texts(args.inputs)
    e1 = MiniLMEngine(threads=1)
    ids = [e1.tokenize(t) for t in texts]
    tokens = sum(map(len, ids))
    v1 = e1.embed(ids)
    serve = _best(lambda: e1.embed(ids), args.repeat)
    commit = _best(lambda: emb.build(e1.model_id, e1.det_class(), ids, v1, 7).encode(), 5)
    blob = emb.build(e1.model_id, e1.det_class(), ids, v1, 7).encode()
    print(f"{len(ids)} inputs, {tokens} tokens, threads 1")
    print(
        f"  serve: {serve:.3f} s = {len(ids) / serve:.0f} inputs/s, {tokens / serve:.0f} tokens/s"
    )
    print(f"  commitment: {commit * 1e3:.2f} ms ({commit / serve:.2%} of serving), {len(blob)} B")
    e2 = MiniLMEngine(threads=2)  # torch's thread count is per process: set by the last engine
    v2 = e2.embed(ids)
    audit = _best(lambda: e2.embed(ids), args.repeat)
    c = emb.decode(blob)
    tol = emb.EmbeddingTolerance(2e-5, 0.99999)
    judge = _best(
        lambda: emb.judge(c, emb.EmbeddingReport("", c.header.context_hashes,
                                                 c.header.token_counts, v2), tol), 5)  # fmt: skip
    print(f"  verifier (threads 2): recompute {audit:.3f} s ({audit / serve:.2f}x serving), "
          f"judge {judge * 1e3:.2f} ms")  # fmt: skip
    e1b = MiniLMEngine(threads=1)
    single = np.concatenate([e1b.embed([x]) for x in ids])
    print("honest error (max |diff| of an element, min cosine):")
    for name, other in (("threads 1 vs 2", v2), ("batched vs one at a time", single)):
        print(f"  {name}: {np.abs(v1 - other).max():.3g}, {(v1 * other).sum(1).min():.8f}")
    for cls in (MiniLMLowPrecision, MiniLMTruncated):
        vc = cls(threads=1).embed(ids)
        err = np.abs(vc - v1).max(axis=1)
        print(f"  cheat {cls.__name__}: least per-input max |diff| {err.min():.3g}, "
              f"highest cosine {(vc * v1).sum(1).max():.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
