"""The choices of one request: which prompt each answers, its index, and its seed (pure).

A request with `n` choices per prompt and several prompts becomes one grid task per choice,
each routed, committed, audited and settled like any answer. Indices follow OpenAI: the
j-th choice of the i-th prompt has index i*n + j.

Seeds: choice j of every prompt samples with `choice_seed(seed, j)`. Choice 0 keeps the
request's seed, so `n=1` and a list of prompts answer exactly as separate requests with
that seed would; choice j > 0 gets sha256("<seed>:<j>") cut to 31 bits. A request without
a seed leaves each choice's seed to `derive_seed` of its own (random) task id, so choices
differ and every one is still fixed before a provider sees it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SEED_BITS = 0x7FFFFFFF  # 31 bits: every engine's sampler takes that


def derive_seed(task_id: str) -> int:
    """The sampling seed for a task whose request gave none: fixed by the task, not the
    provider."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big") & SEED_BITS


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice `j` of a prompt, given the request's seed (None: left to the task)."""
    if seed is None or j == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & SEED_BITS


@dataclass(frozen=True)
class Choice:
    """One choice to generate: its index in the response, its prompt's position, its seed."""

    index: int
    prompt: int
    seed: int | None


def plan(prompts: int, n: int, seed: int | None) -> list[Choice]:
    """Every choice of a request with `prompts` prompts and `n` choices each, by index."""
    return [Choice(i * n + j, i, choice_seed(seed, j)) for i in range(prompts) for j in range(n)]
