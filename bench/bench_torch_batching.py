"""Issue 19, part 5, measured before it is built: what batching the torch engine's decode
would change. W same-length prompts decoded greedily one at a time, then together as one
batch with one KV cache (transformers' DynamicCache), same process, same threads. Prints,
per sequence, the largest hidden-state difference between the two decodes and whether the
tokens agree, then how far the verifier's one-prefill replay (`prefill_states`, what the
torch engine's audit computes) is from each: batching must not move a row further from the
replay than decoding alone already does, or audits of batched answers would need a looser
tolerance. And the speed-up of the batch over the solo decodes.

    PYTHONPATH=src .venv/bin/python bench/bench_torch_batching.py [--width 4] [--tokens 16]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from idlegrid.engines.torch_hf import TorchEngine

PROMPTS = [
    "The capital of France is",
    "Once upon a time there",
    "def fibonacci(n): ret",
    "In 1905 Einstein publish",
    "The quick brown fox jumps",
    "import numpy as np and",
    "Water boils at one hundred",
    "My favourite colour is a",
]


def decode(engine: TorchEngine, batch: list[list[int]], tokens: int) -> tuple[Any, list[list[int]]]:
    """Greedy decode of `batch` together: hidden states [B, tokens, dim] and the tokens."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=engine._config)
    step = torch.tensor(batch, dtype=torch.long)
    states, out_ids = [], [[] for _ in batch]
    with torch.inference_mode():
        for _ in range(tokens):
            out = engine._model.model(input_ids=step, past_key_values=cache, use_cache=True)
            st = out.last_hidden_state[:, -1]
            states.append(st.float().numpy().copy())
            nxt = engine._logits(st).argmax(-1)
            for b, t in enumerate(nxt):
                out_ids[b].append(int(t))
            step = torch.tensor([[int(t)] for t in nxt], dtype=torch.long)
    return np.stack(states, 1), out_ids


def main() -> None:
    """Decode solo and batched, print the differences and the speed-up."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    engine = TorchEngine("gemma3:270m", threads=a.threads)
    ids = [engine.tokenize(p) for p in PROMPTS[: a.width]]
    n = min(len(i) for i in ids)
    ids = [i[:n] for i in ids]  # same length: no padding, so no attention mask in play
    t = time.perf_counter()
    solo = [decode(engine, [i], a.tokens) for i in ids]
    solo_s = time.perf_counter() - t
    t = time.perf_counter()
    together, together_ids = decode(engine, ids, a.tokens)
    batch_s = time.perf_counter() - t
    for b, (states, solo_ids) in enumerate(solo):
        diff = np.abs(states[0] - together[b]).max()
        replay = engine.prefill_states(ids[b] + together_ids[b][:-1])[n - 1 :]
        off_batched = np.abs(replay - together[b]).max()
        off_solo = np.abs(replay - states[0]).max()
        print(
            f"sequence {b}: batched vs solo max |Δh| {diff:.3g} (bit-equal "
            f"{np.array_equal(states[0], together[b])}), tokens equal "
            f"{solo_ids[0] == together_ids[b]}; replay vs batched {off_batched:.3g}, "
            f"vs solo {off_solo:.3g}"
        )
    print(
        f"{a.width} solo decodes {solo_s:.2f} s, one batch {batch_s:.2f} s: "
        f"{solo_s / batch_s:.2f}x ({a.tokens} tokens, prompts of {n}, {a.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
