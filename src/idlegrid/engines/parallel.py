"""How many sequences one engine (llama.cpp or torch) decodes together, chosen from the machine.

`default_parallel` sizes continuous batching from free memory when the operator
gave no `--parallel`: each slot holds a KV cache of `context_per_seq` tokens, so the slots
that fit are what a share of the free memory holds, capped by `MAX_PARALLEL`.
`best_concurrency` reads the start-up benchmark (aggregate decode tokens/s at 1, 2, 4, 8
sequences) and picks how many requests the provider advertises: the fewest sequences
within `NEAR_BEST` of the highest aggregate, since more sequences past that point only
slow every one of them down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MAX_PARALLEL = 8
# Free memory the KV caches may take: the rest stays for the model's compute buffers, the
# agent, the verifier's replay context and whatever else the machine runs.
MEMORY_SHARE = 0.5
# Not capped by cores: one engine thread gains as much from a batch of 8 as two do
# (measured, gemma3:270m: 1.6x the aggregate of one sequence on 1 thread, 2.5x on 2; the
# start-up benchmark then picks the concurrency). A cap of 4 sequences a thread kept
# 1-thread providers at a batch of 4, which here is slower than one sequence.
NEAR_BEST = 0.05


def kv_bytes_per_token(
    n_layer: int, n_head_kv: int, key_len: int, value_len: int, element: int = 2
) -> int:
    """KV-cache bytes one token takes (keys and values, every layer; F16 unless `element`
    bytes a value are given)."""
    return n_layer * n_head_kv * (key_len + value_len) * element


def default_parallel(free_bytes: int, kv_per_token: int, context_per_seq: int) -> int:
    """Sequences to batch when `--parallel` is not given; 0 (off) when fewer than 2 fit."""
    per_seq = max(1, kv_per_token * context_per_seq)
    fit = int(free_bytes * MEMORY_SHARE) // per_seq
    n = min(MAX_PARALLEL, fit)
    return n if n >= 2 else 0


def levels(parallel: int) -> list[int]:
    """Concurrencies the start-up benchmark measures: 1, 2, 4, 8 up to `parallel`, and it."""
    out = [n for n in (1, 2, 4, 8) if n <= parallel]
    if parallel >= 1 and parallel not in out:
        out.append(parallel)
    return out


def best_concurrency(aggregate: Mapping[int, float]) -> int:
    """The fewest sequences whose aggregate tokens/s is within `NEAR_BEST` of the best."""
    if not aggregate:
        return 1
    top = max(aggregate.values())
    return min(n for n, tps in aggregate.items() if tps >= top * (1 - NEAR_BEST))


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
